"""Protection keys for real, in a TCG guest with -cpu max: the mpk backend,
SEGV_PKUERR, a gate, the private-stack gate, and the inspector on the
extension that holds the WRPKRUs."""

import json
import subprocess
import textwrap

from .guest_python import HARNESS, run_script, tagged_json

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
    out = run_script(tmp_path, IN_GUEST, "mpk_check.py")
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
    assert {"sqlite": "mpk", "zlib": "mpk"} in assignments
    assert {"sqlite": "mprotect", "zlib": "mprotect"} in assignments


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


SOUND = textwrap.dedent("""
    import ctypes, json
    from harness._native import pkey
    from harness.isolation.compartments import Domain, parse
    d = Domain(parse({"compartments": [{"name": n, "backend": "mpk"} for n in "abc"]}, "<g>"))
    a, b, c = d["a"], d["b"], d["c"]
    def rights(comp):
        return 0xfffffffc & ~(3 << (2 * comp.pkey))
    d.enter("a")
    out = {"a": pkey.read_pkru() == rights(a)}
    seen = {}
    def in_c():
        seen["c"] = pkey.read_pkru()
    def in_b():
        seen["b"] = pkey.read_pkru()
        c.call(in_c)  # nested: a -> b -> c
        seen["b_after_c"] = pkey.read_pkru()
    b.call(in_b)
    out["nested"] = (seen["b"] == seen["b_after_c"] == rights(b) and seen["c"] == rights(c)
                     and pkey.read_pkru() == rights(a))
    b.call(lambda: c.enter())  # the callee rewrites the thread's compartment state
    out["callee_state"] = pkey.read_pkru() == rights(a)
    code = ctypes.string_at(b.gate_address(), 96)
    first = code.find(b"\\x0f\\x01\\xef")
    second = code.find(b"\\x0f\\x01\\xef", first + 1)
    got = b.jump_into_gate(first, 0, pkey.read_pkru)  # 0: every key open
    out["jump_in"] = got == rights(b) and pkey.read_pkru() == rights(a)
    b.jump_into_gate(second, 0, pkey.read_pkru)  # the return's WRPKRU
    out["jump_out"] = pkey.read_pkru() == rights(a)
    d.close()
    print("SOUND", json.dumps(out))
""")


def test_gates_hold_against_the_code_they_isolate(tmp_path):
    out = tagged_json(run_script(tmp_path, SOUND), "SOUND")
    assert out == {"a": True, "nested": True, "callee_state": True, "jump_in": True,
                   "jump_out": True}


SIGNALLED = textwrap.dedent("""
    import json, os, signal
    from harness._native import pkey
    from harness.isolation.compartments import Domain, parse
    pkey.test_signal_handler(signal.SIGUSR1)  # installed without SA_ONSTACK
    d = Domain(parse({"compartments": [
        {"name": "app", "backend": "mpk"},
        {"name": "lib", "backend": "mpk", "private_stack": True}]}, "<g>"))
    lib = d["lib"]
    d.enter("app")
    def inside():  # on lib's private stack, with lib's rights
        here = pkey.read_pkru()
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered before kill returns
        return here, pkey.read_pkru()
    before, after = d.call("lib", inside)
    seen, sp = pkey.test_signal_seen()
    print("SIGNAL", json.dumps({"lib": 0xfffffffc & ~(3 << (2 * lib.pkey)), "before": before,
                                "after": after, "handler": seen, "sp": sp}))
""")


def test_a_signal_on_a_private_stack_runs_its_handler_with_default_rights(tmp_path):
    out = tagged_json(run_script(tmp_path, SIGNALLED), "SIGNAL")  # the process lived
    assert out["before"] == out["after"] == out["lib"]  # sigreturn restored lib's rights
    assert out["handler"] == 0x55555554 and out["sp"]  # the kernel's default: key 0 only
