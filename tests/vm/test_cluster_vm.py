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
