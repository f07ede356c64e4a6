"""Protection keys for real, in a TCG guest with -cpu max: the mpk backend,
SEGV_PKUERR, a gate, the private-stack gate, and the inspector on the
extension that holds the WRPKRUs."""

import json
import os
import subprocess
import sys
import textwrap

HARNESS = [sys.executable, "-m", "harness.cli"]

IN_GUEST = textwrap.dedent("""
    import subprocess, sys
    from harness._native import pkey
    from harness.errors import IsolationFault
    from harness.isolation.compartments import Domain, parse
    assert pkey.pkey_available(), "no protection keys in the guest"
    d = Domain(parse({"compartments": [
        {"name": "app", "backend": "mpk", "heap": "64KiB"},
        {"name": "kv", "backend": "mpk", "heap": "64KiB", "private_stack": True}]}, "<g>"))
    try:
        d.probe("app", "kv")
    except IsolationFault as e:
        print("FAULT", e)
    kv = d["kv"]
    d.enter("app")
    print("GATE", d.call("kv", lambda: memoryview(kv).__setitem__(0, 9) or "ok"))
    print("AFTER", d["app"].probe(kv.address))
    c, _ = kv.bench_gate(20, private_stack=True)
    print("STACKGATE", len(c))
    d.close()
    child = subprocess.run([sys.executable, "-c",
        "from harness._native import pkey\\n"
        "a = pkey.Compartment('a', 'mpk', 1 << 16); b = pkey.Compartment('b', 'mpk', 1 << 16)\\n"
        "pkey.segv_report_install(); a.enter(); memoryview(b)[0] = 1\\n"], capture_output=True,
        text=True)
    print("CHILD", child.returncode, child.stderr.strip().splitlines()[-1])
""")


def test_mpk_in_a_guest(tmp_path):
    script = tmp_path / "mpk_check.py"
    script.write_text(IN_GUEST)
    os.chmod(script, 0o644)
    r = subprocess.run([*HARNESS, "boot", "--", sys.executable, str(script)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "FAULT compartment 'app' (mpk) touched the memory of 'kv' (mpk)" in out
    assert "SEGV_PKUERR" in out
    assert "GATE ok" in out and "AFTER SEGV_PKUERR" in out and "STACKGATE 20" in out
    assert "CHILD -11 dh: SIGSEGV si_code=4" in out  # SEGV_PKUERR


def test_wrpkru_only_in_gates():
    from harness._native import pkey as mod

    r = subprocess.run([*HARNESS, "inspect", mod.__file__], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_explore_in_a_guest_includes_mpk(tmp_path):
    cfg = tmp_path / "e.toml"
    cfg.write_text("[workload]\nrequests = 200\n")
    r = subprocess.run([*HARNESS, "explore", str(cfg), "--placement", "vm", "--json",
                        "--plot", ""], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assignments = [c["assignment"] for c in json.loads(r.stdout)["configurations"]]
    assert {"kv": "mpk", "log": "mpk"} in assignments
    assert {"kv": "mprotect", "log": "mprotect"} in assignments


def test_deterministic_gate_figures_repeat():
    runs = []
    for _ in range(2):
        r = subprocess.run([*HARNESS, "bench", "gates", "--placement", "vm", "--deterministic",
                            "-n", "50", "--json"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        runs.append({row["metric"]: row["p50"] for row in json.loads(r.stdout)["rows"]})
    # Under -icount the cycle rows are instruction counts: they repeat exactly.
    for metric in ("gate_none", "gate_mpk_light", "gate_mpk_stack"):
        assert runs[0][metric] == runs[1][metric], metric
    # The ns rows add two clock_gettime calls per batch of 100, and the vDSO's
    # cost moves by a few instructions when a second has rolled over since the
    # last tick (its division is a loop), so they agree to within that.
    for metric in ("gate_none_ns", "gate_mpk_light_ns", "gate_mpk_stack_ns"):
        assert abs(runs[0][metric] - runs[1][metric]) <= 0.2, metric
