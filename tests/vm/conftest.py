"""VM tests: every test here boots real QEMU guests. A factory fixture makes
the VMs, keeps their console logs when a test fails, and kills every VM it
made, whatever happened. (Test outcomes reach it through the harness's
pytest plugin, which records them on each test item.)"""

import shutil
from pathlib import Path

import pytest

from harness import images
from harness.pytest_plugin import call_failed
from harness.vm import accel
from harness.vm.machine import VM
from harness.vm.qemu import MachineConfig

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-logs"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)
            # A hang guard, not a time limit: TCG guests on a shared 2-core
            # host beside a CPU-bound process take twice their usual time.
            item.add_marker(pytest.mark.timeout(300))


@pytest.fixture(scope="session")
def image():
    return images.build()


@pytest.fixture(scope="session")
def probe():
    return accel.probe()


@pytest.fixture
def make_vm(request, tmp_path, image, probe):
    made: list[VM] = []

    def make(script_text: str | None = None, **kw) -> VM:
        name = kw.pop("name", f"t{len(made)}")
        if script_text is not None:
            script = tmp_path / f"{name}.sh"
            script.write_text(script_text)
            script.chmod(0o755)
            kw.setdefault("script", script.name)
        vm = VM(MachineConfig(name=name, image=image, accel=probe, run_dir=tmp_path, **kw))
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.stop()
    if call_failed(request):
        dest = ARTIFACTS / request.node.name
        dest.mkdir(parents=True, exist_ok=True)
        for log in tmp_path.glob("*.console.log"):
            shutil.copy(log, dest)
