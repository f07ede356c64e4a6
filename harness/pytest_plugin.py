"""A pytest plugin for people who test against a cluster (loaded by the
`pytest11` entry point once the harness is installed).

    def test_my_scheduler(cluster):
        c = cluster("lego3", placement="vm")    # a factory: make as many as needed
        assert c.sql("SELECT count(*) FROM nodes") == [[3]]

Every cluster a test made is stopped when it ends, whatever happened; a
failed test keeps the clusters' run directories (node logs, consoles) and
says where they are, in the manner of Firecracker's test framework."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest

from harness.nodes.cluster import Cluster, open_cluster

_serial = itertools.count()
CALL_REPORT = pytest.StashKey[pytest.TestReport]()  # a test body's, for fixtures' teardowns


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    rep = yield
    if rep.when == "call":
        item.stash[CALL_REPORT] = rep
    return rep


def call_failed(request: pytest.FixtureRequest) -> bool:
    """Did the test body of the requesting fixture's test fail? (For a
    fixture's teardown; the hook above records the outcome.)"""
    rep = request.node.stash.get(CALL_REPORT, None)
    return rep is not None and rep.failed


@pytest.fixture
def cluster(request, tmp_path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(topology: str = "lego3", **kw) -> Cluster:
        # The shm directory takes this name, so it is unique to this process
        # (and short: sockets in the run directory must fit AF_UNIX's limit).
        c = open_cluster(topology, run_dir=tmp_path / f"{os.getpid()}.{next(_serial)}", **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
    if call_failed(request):
        for c in made:
            request.node.add_report_section("teardown", "cluster logs",
                                            f"{c.name}: logs kept in {c.run_dir}")
