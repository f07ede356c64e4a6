"""Design-space exploration on SQLite and zlib: the partial safety order,
real runs of every configuration the host supports (each checked against
Python's zlib), the budget, and the errors a user can cause."""

import json
import subprocess
import sys
import textwrap

import pytest

from harness.errors import HarnessError, TopologyError
from harness.isolation.explore import load, run, safer_or_equal


def test_the_safety_order_is_partial():
    none = {"sqlite": "none", "zlib": "none"}
    mp = {"sqlite": "mprotect", "zlib": "none"}
    mk = {"sqlite": "mpk", "zlib": "none"}
    both = {"sqlite": "mprotect", "zlib": "mprotect"}
    assert safer_or_equal(mp, none) and not safer_or_equal(none, mp)
    assert safer_or_equal(both, mp) and not safer_or_equal(mp, both)
    assert not safer_or_equal(mp, mk) and not safer_or_equal(mk, mp)  # incomparable
    rpc = {"sqlite": "rpc", "zlib": "none"}
    assert safer_or_equal(rpc, mp) and safer_or_equal(rpc, mk) and not safer_or_equal(mp, rpc)
    assert not safer_or_equal(rpc, both) and not safer_or_equal(both, rpc)  # incomparable


def config(tmp_path, backends=("none", "mprotect", "rpc"), requests=200):
    p = tmp_path / "e.toml"
    p.write_text(f"[workload]\nrequests = {requests}\nvalue_bytes = 128\n"
                 f"[explore]\nbackends = {list(backends)}\n")
    return p


def test_every_supported_configuration_runs_and_the_budget_picks(tmp_path):
    seen = []
    outcomes, notes = run(config(tmp_path), budget=1e-9, progress=seen.append)
    names = {o.name for o in outcomes}
    assert len(names) == 9 and {"sqlite=none,zlib=none", "sqlite=mprotect,zlib=mprotect",
                                "sqlite=rpc,zlib=mprotect", "sqlite=rpc,zlib=rpc"} <= names
    assert seen[0] == "configuration 1 of 9: sqlite=none, zlib=none" and len(seen) == 9
    assert all(o.requests_per_s > 0 for o in outcomes)
    safest = [o.name for o in outcomes if o.safest_in_budget]
    assert safest == ["sqlite=rpc,zlib=rpc"]  # a node of its own for each beats everything
    assert any("equals what Python's zlib makes" in n for n in notes)
    outcomes, _ = run(config(tmp_path, ("none", "mprotect")), budget=1e-9)
    assert [o.name for o in outcomes if o.safest_in_budget] == ["sqlite=mprotect,zlib=mprotect"]
    outcomes, _ = run(config(tmp_path, ("none", "mprotect")), budget=1.0)  # only the fastest
    fastest = max(outcomes, key=lambda o: o.requests_per_s)  # which one is the machine's say
    assert [o.name for o in outcomes if o.safest_in_budget] == [fastest.name]


def test_a_table_that_differs_from_zlibs_stops_the_run():
    # The check compares with Python's zlib: give it another level than the
    # boxes used, and the first rows differ.
    p = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import zlib
        from harness.isolation import explore
        real = zlib.compress
        explore.zlib = type("Z", (), {"compress": staticmethod(lambda d, level: real(d, 1))})
        try:
            explore._run({"sqlite": "none", "zlib": "mprotect"}, explore.values(50, 256), 9)
        except Exception as e:
            print(type(e).__name__, e)
    """)], capture_output=True, text=True, timeout=60)
    assert "HarnessError explore: configuration {'sqlite': 'none', 'zlib': 'mprotect'} " \
        "left rows 0.. that differ" in p.stdout, p.stdout + p.stderr


def test_cli_json_and_plot(tmp_path):
    png = tmp_path / "e.png"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "explore",
                        str(config(tmp_path, ("none", "mprotect"), 100)), "--json",
                        "--plot", str(png)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["configurations"]) == 4
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("text,key", [
    ("[workload]\nrequests = 0\n", "workload.requests"),
    ("[workload]\nlevel = 12\n", "workload.level"),
    ("[workload]\nvalue_bytes = 1000000\n", "workload.value_bytes"),
    ("[explore]\nbackends = ['sgx']\n", "explore.backends"),
    ("[workload\n", "not valid TOML"),
])
def test_config_errors(tmp_path, text, key):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(TopologyError, match=key):
        load(p)
    with pytest.raises(TopologyError, match=key):
        run(p)  # before any process starts


def test_a_failed_run_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # a zlib module that cannot compress
    (tmp_path / "zlib.py").write_text("raise ImportError('no zlib here')\n")
    with pytest.raises(HarnessError, match=r"(?s)explore failed \(status 1\):.*no zlib here"):
        run(config(tmp_path))
