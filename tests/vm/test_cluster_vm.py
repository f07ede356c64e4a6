"""The multi-VM cluster as people use it: `harness up --placement vm`,
status, sql, run, down, and nothing left behind."""

import json
import os
import subprocess
import sys
import time

from ..unit.helpers import alive

HARNESS = [sys.executable, "-m", "harness.cli"]


def run(*args, env, timeout=300):
    return subprocess.run([*HARNESS, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_up_status_sql_down_with_vms(tmp_path):
    env = {**os.environ, "HARNESS_RUN_DIR": str(tmp_path)}
    up = subprocess.Popen([*HARNESS, "up", "--placement", "vm"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            r = run("status", "--json", env=env)
            if r.returncode == 0:
                break
            assert up.poll() is None, up.stderr.read()
            time.sleep(0.5)
        state = json.loads(r.stdout)
        assert [(n["name"], n["state"], n["accel"]) for n in state["nodes"]] == [
            ("pnode0", "ready", "tcg"), ("mnode0", "ready", "tcg"), ("snode0", "ready", "tcg")]
        q = run("sql", "--json", "SELECT count(*) FROM tasks", env=env)
        assert q.returncode == 0 and json.loads(q.stdout)["rows"] == [[0]], q.stderr
        qemu = [n["pid"] for n in state["nodes"]]
        assert all(alive(p) for p in qemu)
        assert run("down", env=env).returncode == 0
        assert up.wait(60) == 0
        assert not any(alive(p) for p in qemu)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_run_passes_output_and_status(tmp_path):
    env = {**os.environ, "HARNESS_RUN_DIR": str(tmp_path)}
    r = run("run", "--placement", "vm", "--", "sh", "-c", "uname -r; exit 3", env=env)
    assert r.returncode == 3 and r.stdout.strip().endswith("amd64"), r.stderr


def test_stream_links_between_vms(tmp_path):
    """pnode0 -> mnode0 over a Unix-socket stream, pnode0 -> snode0 over TCP:
    virtio-serial ports joined by QEMU. The links answer at start, and the
    pnode claims and runs a DBOS task from the snode over the TCP stream."""
    from harness import topology
    from harness.nodes.cluster import open_cluster

    topo = topology.parse({"name": "streams", "placement": "vm", "nodes": [
        {"name": "pnode0", "role": "pnode"}, {"name": "mnode0", "role": "mnode"},
        {"name": "snode0", "role": "snode"}], "links": [
        {"between": ["pnode0", "mnode0"], "kind": "unix"},
        {"between": ["pnode0", "snode0"], "kind": "tcp"}]}, "<test>")
    with open_cluster(topo, run_dir=tmp_path, timeout=300) as c:
        assert set(c.nodes["pnode0"].peers) == {"mnode0", "snode0"}
        qemu = {n["name"]: n["pid"] for n in c.status()}
        cmd = open(f"/proc/{qemu['pnode0']}/cmdline").read()
        assert "virtserialport" in cmd and "dh.s." in cmd and "reconnect=1" in cmd
        tid = c.dbos.sched.submit(["sh", "-c", "echo over a tcp stream"])
        assert c.wait_tasks([tid], timeout=120) == 1
    assert not any(alive(p) for p in qemu.values())
