"""The command line as a user runs it: real subprocesses of `harness`."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from harness.cli import build_parser

from .helpers import alive

HARNESS = [sys.executable, "-m", "harness.cli"]


def run(*args, timeout=120, **kw):
    return subprocess.run([*HARNESS, *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def subcommands() -> list[str]:
    """The commands `harness --help` lists: each begins a line under COMMAND."""
    return re.findall(r"(?m)^ {4}(\S+)", build_parser().format_help())


def test_help_lists_the_commands():
    assert {"doctor", "up", "status", "down", "sql", "bench", "run", "demo"} <= set(subcommands())


@pytest.mark.parametrize("cmd", subcommands())
def test_every_subcommand_has_help(cmd):
    r = run(cmd, "--help", timeout=30)
    assert r.returncode == 0 and "usage: harness" in r.stdout


def test_doctor_json_reports_each_check():
    r = run("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert {"qemu", "userfaultfd", "pkeys", "busybox", "shm"} <= set(checks)
    for c in checks.values():
        assert c["ok"] or c["fix"], f"{c['name']} is missing without a fix"
    assert r.returncode == (0 if all(c["ok"] or not c["required"] for c in checks.values())
                            else 1)


def test_bench_transport_json_follows_the_contract():
    r = run("bench", "transport", "--link", "shm", "-n", "2000", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bench"] == "transport" and out["placement"] == "process"
    rows = {row["metric"]: row for row in out["rows"]}
    assert set(rows) == {"rtt_64", "rtt_4k", "throughput_4k"}
    for row in rows.values():
        assert set(row) == {"metric", "unit", "p50", "p99", "n", "floor", "floor_p50", "ratio"}
        assert row["p50"] > 0 and row["p99"] >= row["p50"] and row["floor_p50"] > 0
        assert row["ratio"] == pytest.approx(row["p50"] / row["floor_p50"])


def test_up_status_down(tmp_path):
    env = {**os.environ, "HARNESS_RUN_DIR": str(tmp_path)}
    up = subprocess.Popen([*HARNESS, "up"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            r = run("status", "--json", env=env)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        state = json.loads(r.stdout)
        assert r.returncode == 0, r.stderr
        assert [(n["name"], n["state"]) for n in state["nodes"]] == [
            ("pnode0", "ready"), ("mnode0", "ready"), ("snode0", "ready")]
        pids = [n["pid"] for n in state["nodes"]]
        again = run("up", env=env)
        assert again.returncode == 1 and "already running" in again.stderr
        human = run("status", env=env)
        assert "pnode0" in human.stdout and "ready" in human.stdout
        q = run("sql", "--json", "SELECT count(*) FROM tasks", env=env)
        assert q.returncode == 0 and json.loads(q.stdout)["rows"] == [[0]], q.stderr
        bad = run("sql", "SELECT nonsense FROM nowhere", env=env)
        assert bad.returncode == 1 and "no such table" in bad.stderr
        down = run("down", env=env)
        assert down.returncode == 0, down.stderr
        assert up.wait(30) == 0
        assert not any(alive(pid) for pid in pids)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.wait(30)
    r = run("status", "--json", env=env)
    assert r.returncode == 1 and all(n["state"] == "down" for n in json.loads(r.stdout)["nodes"])


def test_sql_on_a_local_file(tmp_path):
    db = str(tmp_path / "new.sqlite")
    r = run("sql", "--db", db, "--json", "SELECT name FROM sqlite_master WHERE type = 'table' "
            "ORDER BY name")
    assert r.returncode == 0, r.stderr
    names = [row[0] for row in json.loads(r.stdout)["rows"]]
    assert {"nodes", "tasks", "workers", "messages", "files", "dirs", "regions", "pages",
            "events"} <= set(names)
    w = run("sql", "--db", db, "--write", "INSERT INTO nodes (name, role, updated) "
            "VALUES (?, ?, 0)", "n1", "pnode")
    assert w.returncode == 0 and "1 row(s) changed" in w.stderr
    assert run("sql", "--db", db, "DELETE FROM nodes").returncode == 1
    bad = run("sql", "--db", db, "SELEC")
    assert bad.returncode == 1 and "syntax error" in bad.stderr
    t = run("sql", "--db", db, "SELECT name, role FROM nodes")
    assert t.stdout.split() == ["name", "role", "----", "-----", "n1", "pnode"]


def test_status_with_no_cluster_says_how_to_start_one(tmp_path):
    env = {**os.environ, "HARNESS_RUN_DIR": str(tmp_path)}
    r = run("status", env=env)
    assert r.returncode == 1 and "harness up" in r.stderr
    r = run("down", env=env)
    assert r.returncode == 1 and "no cluster named 'lego3' is running" in r.stderr


def test_bad_topology_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[nodes]]\nname = "a"\nrole = "cpu"\n')
    r = run("up", str(bad), env={**os.environ, "HARNESS_RUN_DIR": str(tmp_path)})
    assert r.returncode == 1 and f"{bad}: nodes[0].role: expected one of" in r.stderr


def test_console_script_is_installed():
    exe = shutil.which("harness", path=os.path.dirname(sys.executable))
    assert exe, "pip install should have put `harness` beside the venv's python"
    assert subprocess.run([exe, "--help"], capture_output=True, timeout=30).returncode == 0
