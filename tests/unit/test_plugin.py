"""The `cluster` fixture that the harness gives pytest users."""

from ..unit.helpers import alive

pids: list[int] = []


def test_the_fixture_makes_clusters(cluster):
    c = cluster("lego3")
    assert [r["state"] for r in c.status()] == ["ready"] * 3
    pids.extend(h.runner.pid for h in c.nodes.values())


def test_and_stops_them_after_the_test():
    assert pids and not any(alive(p) for p in pids)


def test_a_failed_test_says_where_its_cluster_logs_are(pytester):
    pytester.makepyfile("""
        def test_fails(cluster):
            cluster("lego3")
            assert False

        def test_passes(cluster):
            cluster("lego3")
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*Captured cluster logs teardown*",
                                 "lego3: logs kept in */test_fails0/*.*"])
    assert result.stdout.str().count("logs kept in") == 1  # not for the test that passed
