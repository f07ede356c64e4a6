"""Snapshot starts, as a user meets them: a restored guest behaves as a
cold one does, and is a fresh guest, not a copy of the one saved."""

import json
import sys
import time

import pytest

from harness._native.transport import Op
from harness.nodes.cluster import open_cluster
from harness.smoke import MPK_FAULT, PAGE_ROUND_TRIP

from .test_boot import harness

PROBE = ("import os, time; print(os.urandom(16).hex(), time.time(), "
         "open('/proc/sys/kernel/random/boot_id').read().strip())")


def test_restored_boot_passes_output_and_status_through():
    r = harness("boot", "--", "sh", "-c", "echo hi; exit 7")
    assert (r.returncode, r.stdout) == (7, b"hi\n"), r.stderr
    snaps = json.loads(harness("snapshot", "list", "--json").stdout)["snapshots"]
    assert any(s["node"] == "boot-pnode" for s in snaps)


def test_two_restored_guests_have_their_own_randomness_and_the_hosts_clock():
    out = []
    for _ in range(2):
        r = harness("boot", "--", "python3", "-c", PROBE)
        assert r.returncode == 0, r.stderr
        rand, clock, boot_id = r.stdout.decode().split()
        assert abs(float(clock) - time.time()) < 30  # not the clock saved with the state
        out.append((rand, boot_id))
    assert out[0][0] != out[1][0]


@pytest.mark.parametrize("cold", [False, True], ids=["restored", "cold"])
def test_a_restored_cluster_passes_what_a_cold_one_passes(cold):
    with open_cluster("lego3", placement="vm", timeout=180, cold=cold) as c:
        assert all(h.runner.restored == (not cold) for h in c.nodes.values())
        assert c.call("mnode0", Op.PING) == b""
        for code in (PAGE_ROUND_TRIP, MPK_FAULT):
            r = c.exec("pnode0", [sys.executable, "-c", code], timeout=120)
            assert r.returncode == 0, r.stderr
        assert c.sql("SELECT count(*) FROM nodes WHERE state = 'ready'") == [[3]]
        c.fault("mnode0", "restart", timeout=120)  # a restart restores again
        r = c.exec("pnode0", [sys.executable, "-c", PAGE_ROUND_TRIP], timeout=120)
        assert r.returncode == 0, r.stderr
        disk = c.exec("snode0", ["sh", "-c", "mount | grep -c ' /run/dh/disk '"])
        assert disk.stdout.strip() == b"1"


def test_a_restored_node_gets_the_clusters_secret_not_one_from_the_snapshot():
    secrets = []
    for _ in range(2):
        with open_cluster("lego3", placement="vm", timeout=180) as c:
            spec = c.exec("pnode0", ["cat", "/run/dh/run/pnode0.json"]).stdout
            assert json.loads(spec)["secret"] == c.secret
            secrets.append(c.secret)
    assert secrets[0] != secrets[1]


def test_a_snapshot_that_does_not_load_is_taken_again_and_the_cluster_comes_up():
    from harness.vm.snapshot import list_snapshots

    with open_cluster("lego3", placement="vm", timeout=180) as c:
        key = c.nodes["mnode0"].runner.snapshot
    [snap] = [s for s in list_snapshots() if s.key == key]
    with open(snap.state, "r+b") as f:  # no longer a migration stream
        f.write(b"\0" * 4096)
    said = []
    with open_cluster("lego3", placement="vm", timeout=180, progress=said.append) as c:
        assert all(h.runner.restored for h in c.nodes.values())
        assert c.nodes["mnode0"].runner.snapshot == key
        assert c.call("mnode0", Op.PING) == b""
        assert json.loads(c.call("pnode0", Op.PING, b"peers", timeout=10)).keys() == {
            "mnode0", "snode0"}
    assert any(f"snapshot {key} did not load" in m for m in said), said
    [again] = [s for s in list_snapshots() if s.key == key]
    assert again.built > snap.built
