"""The `cluster` fixture that the harness gives pytest users."""

from ..unit.helpers import alive

pids: list[int] = []


def test_the_fixture_makes_clusters(cluster):
    c = cluster("lego3")
    assert [r["state"] for r in c.status()] == ["ready"] * 3
    pids.extend(h.runner.pid for h in c.nodes.values())


def test_and_stops_them_after_the_test():
    assert pids and not any(alive(p) for p in pids)
