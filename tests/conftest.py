import pytest

pytest_plugins = ["pytester"]  # test_plugin.py runs pytest on a test file


@pytest.fixture(autouse=True, scope="session")
def _isolated_run_dir(tmp_path_factory):
    """Clusters started by tests keep their run directories out of the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HARNESS_RUN_DIR", str(tmp_path_factory.mktemp("run")))
    yield
    mp.undo()


@pytest.fixture
def lego3(cluster):
    """One lego3 cluster of host processes, made by the plugin's `cluster`
    factory (which stops it and, when the test fails, says where its logs are)."""
    return cluster("lego3", placement="process")
