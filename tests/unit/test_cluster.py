"""Nodes as host processes: the lego3 cluster starts, answers, runs
commands, survives a malformed frame on one link, and leaves nothing
behind."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness import topology
from harness._native import transport as t
from harness.dbos import DBOSError, FSError
from harness.errors import (
    ClusterError,
    HarnessError,
    LinkClosed,
    NotSupported,
    ProtocolError,
    RemoteError,
    TransportError,
)
from harness.nodes.cluster import open_cluster

from .helpers import alive


def test_lego3_starts_and_every_node_answers(lego3):
    rows = lego3.status()
    assert [(r["name"], r["role"], r["state"]) for r in rows] == [
        ("pnode0", "pnode", "ready"), ("mnode0", "mnode", "ready"), ("snode0", "snode", "ready")]
    hello = json.loads(lego3.call("mnode0", t.Op.HELLO))
    assert hello["role"] == "mnode" and hello["pid"] == rows[1]["pid"]
    assert set(lego3.nodes["pnode0"].peers) == {"mnode0", "snode0"}


def test_exec_passes_status_and_output(lego3):
    r = lego3.exec("pnode0", ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    r = lego3.exec("pnode0", ["cat"], stdin=b"fed in")
    assert r.stdout == b"fed in"


def test_exec_of_a_missing_program_is_a_clear_error(lego3):
    with pytest.raises(HarnessError, match=r"^pnode0: no such program: /no/such/thing$"):
        lego3.exec("pnode0", ["/no/such/thing"])


def test_stats_count_link_traffic(lego3):
    s = lego3.stats()
    assert s["pnode0"]["links"]["mnode0"]["frames_sent"] >= 1
    assert s["snode0"]["role"] == "snode"


def test_malformed_frame_closes_one_link_and_the_node_keeps_serving(lego3):
    """Garbage on the pnode->mnode ring: mnode closes that link, still
    answers its controller; pnode sees the link closed."""
    path = next(e["path"] for e in json.loads(
        (lego3.run_dir / "mnode0.json").read_text())["links"])
    intruder = t.Link.shm_open(path, 0, name="intruder")  # pose as the pnode end
    intruder.send_raw(b"DHF1 this is not a frame at all")
    deadline = time.monotonic() + 5
    with pytest.raises(LinkClosed):  # once mnode has dropped the link
        while time.monotonic() < deadline:
            intruder.send(t.Op.PING, timeout=0.1)
            time.sleep(0.01)
    assert lego3.call("mnode0", t.Op.PING, timeout=2) == b""
    stats = json.loads(lego3.call("mnode0", t.Op.STATS))
    assert stats["links"]["pnode0"]["proto_errors"] == 1
    with pytest.raises(RemoteError, match="closed"):
        lego3.call("pnode0", t.Op.PING, b"peers", timeout=5)


def test_dbos_on_the_snode(lego3):
    assert lego3.sql("SELECT name, role FROM nodes ORDER BY nid") == [
        ["pnode0", "pnode"], ["mnode0", "mnode"], ["snode0", "snode"]]
    fs = lego3.dbos.fs
    fs.mkdir("/home")
    fs.create("/home/f")
    fs.write("/home/f", 0, b"\x00binary\xff")
    assert fs.read("/home/f") == b"\x00binary\xff"
    with pytest.raises(FSError) as e:
        fs.create("/home/f")
    assert e.value.errno == errno.EEXIST
    with pytest.raises(DBOSError, match="syntax error"):
        lego3.sql("SELEC 1")
    with pytest.raises(DBOSError, match="write=True"):
        lego3.sql("DELETE FROM tasks")
    path = lego3.stats()["snode0"]["dbos"]["path"]
    assert path.startswith(str(lego3.disk_dir))


def test_the_pnode_runs_the_tasks_it_is_given(lego3):
    tid = lego3.dbos.sched.submit(["sh", "-c", "echo ran on $0", "pnode"])
    assert lego3.wait_tasks([tid], timeout=20) == 1
    [[worker, result]] = lego3.sql("SELECT worker_id, result FROM tasks WHERE task_id = ?",
                                   [tid])
    assert worker == "pnode0"
    assert json.loads(result)["stdout"] == "ran on pnode\n"


def test_a_link_between_a_vm_and_a_process_is_refused_with_the_fix():
    mixed = topology.parse({"name": "mixed", "nodes": [
        {"name": "p", "role": "pnode", "placement": "vm"}, {"name": "m", "role": "mnode"}],
        "links": [{"between": ["p", "m"]}]}, "<test>")
    with pytest.raises(NotSupported, match="place both ends in VMs or both as processes"):
        open_cluster(mixed)


@pytest.mark.parametrize("missing, fix", [("image", "`harness images build`"),
                                           ("probe", "`harness doctor`")])
def test_vm_nodes_without_an_image_or_accel_are_an_error_naming_the_fix(monkeypatch, missing,
                                                                        fix):
    # Never a quiet fallback to processes.
    from harness import images
    from harness.errors import ImageError, LaunchError
    from harness.vm import accel

    def fails(exc):
        def f(*_a, **_k):
            raise exc
        return f

    if missing == "image":
        monkeypatch.setattr(images, "build", fails(ImageError("no busybox")))
    else:
        monkeypatch.setattr(images, "build", lambda **_k: None)
        monkeypatch.setattr(accel, "probe", fails(LaunchError("no TCG")))
    with pytest.raises(ClusterError, match=r"pnode0, mnode0, snode0: placed in VMs") as e:
        open_cluster("lego3", placement="vm")
    assert fix in str(e.value) and "no " in str(e.value)


def test_stop_leaves_no_process_and_no_shm():
    c = open_cluster("lego3")
    pids = [h.runner.pid for h in c.nodes.values()]
    shm = c.shm_dir
    assert shm.exists()
    c.stop()
    assert not any(alive(p) for p in pids)
    assert not shm.exists() and not c.run_dir.exists()


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_stream_links_between_nodes(tmp_path, kind):
    topo = topology.load("lego3")
    text = (topology.BUILTIN_DIR / "lego3.toml").read_text().replace(
        'kind = "shm"', f'kind = "{kind}"')
    path = tmp_path / "streams.toml"
    path.write_text(text)
    topo = topology.load(path)
    with open_cluster(topo) as c:
        peers = json.loads(c.call("pnode0", t.Op.PING, b"peers"))
        assert set(peers) == {"mnode0", "snode0"}


def test_a_node_that_dies_at_start_is_reported(tmp_path, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[[nodes]]\nname = "p"\nrole = "pnode"\n')
    # Every Python the cluster starts now dies at start-up, as a broken node would.
    (tmp_path / "sitecustomize.py").write_text("raise SystemExit('boom at import')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(ClusterError,
                       match=r"(?s)p exited with status 1 before it was ready.*boom at import"):
        open_cluster(bad, timeout=20)


def test_controller_sigkill_takes_the_nodes_down(tmp_path):
    code = ("from harness.nodes.cluster import open_cluster\n"
            "c = open_cluster('lego3')\n"
            "print(' '.join(str(h.runner.pid) for h in c.nodes.values()), flush=True)\n"
            "import time; time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    pids = [int(x) for x in p.stdout.readline().split()]
    assert len(pids) == 3 and all(alive(x) for x in pids)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 5
    while any(alive(x) for x in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(x) for x in pids)


def test_protocol_error_type_is_a_transport_error():
    assert issubclass(ProtocolError, TransportError)


def test_alloc_is_disaggregated_memory_on_the_mnode():
    import numpy as np

    with open_cluster("lego3", cache="256KiB") as c:
        region = c.alloc(1 << 20)  # four times the cache
        a = np.frombuffer(region, dtype=np.uint32)
        a[:] = np.arange(len(a), dtype=np.uint32)
        assert (a == np.arange(len(a), dtype=np.uint32)).all()
        del a
        s = c.stats()
        assert s["excache"]["misses"] >= 256 and s["excache"]["dirty_flushes"] > 0
        assert s["mnode0"]["memory"]["pages_stored"] == s["excache"]["dirty_flushes"]
        # Owned by the node that runs the code: the caller's process.
        assert c.sql("SELECT node, owner, size FROM regions") == [
            ["mnode0", "controller", 1 << 20]]
        [[node, resident]] = c.sql("SELECT node, resident FROM pages")
        assert node == "controller" and resident == 64  # 256 KiB of lines


def test_a_reply_over_the_links_limit_is_refused_not_cut(lego3):
    """A DBOS read whose answer is larger than the control link carries comes
    back as an error naming both sizes, not as JSON cut at the limit."""
    fs = lego3.dbos.fs
    fs.create("/big")
    chunk = bytes(range(256)) * 512  # 128 KiB a request
    for i in range(5):
        fs.write("/big", i * len(chunk), chunk)
    with pytest.raises(RemoteError, match=r"the reply is \d+ bytes, over this link's limit of "
                                          r"\d+ bytes"):
        fs.read("/big")
    assert fs.read("/big", 0, len(chunk)) == chunk  # in parts it works, on the same link
