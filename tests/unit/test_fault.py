"""Fault injection on process nodes: kill, pause, resume, restart; committed
rows survive an snode's death; a paused node times out, naming itself."""

import json

import pytest

from harness._native.transport import Op
from harness.errors import RemoteError, TransportError, TransportTimeout
from harness.nodes.cluster import open_cluster

from .helpers import alive


def test_a_committed_row_survives_kill_and_restart(lego3):
    lego3.sql("INSERT INTO nodes (name, role, updated) VALUES ('extra', 'pnode', 0)",
              write=True)
    pid = lego3.nodes["snode0"].runner.pid
    lego3.fault("snode0", "kill")
    assert not alive(pid)
    assert [r["state"] for r in lego3.status() if r["name"] == "snode0"] == ["down"]
    with pytest.raises(TransportError, match="snode0"):
        lego3.sql("SELECT 1")
    lego3.fault("snode0", "restart")
    assert lego3.sql("SELECT name FROM nodes WHERE name = 'extra'") == [["extra"]]
    # the pnode's link to the restarted snode works again, and its task
    # worker, which lost the snode, claims work from the new one
    assert set(json.loads(lego3.call("pnode0", Op.PING, b"peers", timeout=10))) == {
        "mnode0", "snode0"}
    tid = lego3.dbos.sched.submit(["sh", "-c", "echo after the restart"])
    assert lego3.wait_tasks([tid], timeout=30) == 1


def test_a_restarted_pnode_is_served_again_by_its_peers(lego3):
    lego3.fault("pnode0", "kill")
    lego3.fault("pnode0", "restart")
    assert set(json.loads(lego3.call("pnode0", Op.PING, b"peers", timeout=10))) == {
        "mnode0", "snode0"}
    tid = lego3.dbos.sched.submit(["true"])
    assert lego3.wait_tasks([tid], timeout=30) == 1


def test_pause_times_out_naming_the_node_and_resume_recovers(lego3):
    lego3.fault("mnode0", "pause")
    assert [r["state"] for r in lego3.status() if r["name"] == "mnode0"] == ["paused"]
    with pytest.raises(TransportTimeout, match="mnode0"):
        lego3.call("mnode0", Op.PING, timeout=0.5)
    lego3.fault("mnode0", "resume")
    assert lego3.call("mnode0", Op.PING, timeout=5) == b""


def test_unknown_fault_and_node(lego3):
    with pytest.raises(ValueError, match="kill, pause, resume, restart"):
        lego3.fault("snode0", "melt")
    with pytest.raises(Exception, match="no node named 'nope'"):
        lego3.fault("nope", "kill")


def test_a_killed_node_is_reported_by_its_peer_as_a_closed_link(lego3):
    lego3.fault("mnode0", "kill")
    with pytest.raises(RemoteError, match="mnode0: call PING: link closed by peer"):
        lego3.call("pnode0", Op.PING, b"peers", timeout=10)


def test_restart_needs_shm_links(tmp_path):
    from harness import topology
    from harness.errors import NotSupported

    text = (topology.BUILTIN_DIR / "lego3.toml").read_text().replace('kind = "shm"',
                                                                      'kind = "unix"')
    (tmp_path / "s.toml").write_text(text)
    with open_cluster(tmp_path / "s.toml") as c:
        with pytest.raises(NotSupported, match="stream links"):
            c.fault("mnode0", "restart")
