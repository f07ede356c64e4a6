"""Design-space exploration: the partial safety order, real runs of every
configuration the host supports, and the budget."""

import json
import subprocess
import sys

import pytest

from harness.errors import TopologyError
from harness.isolation.explore import explore, load, safer_or_equal


def test_the_safety_order_is_partial():
    none = {"kv": "none", "log": "none"}
    mp = {"kv": "mprotect", "log": "none"}
    mk = {"kv": "mpk", "log": "none"}
    both = {"kv": "mprotect", "log": "mprotect"}
    assert safer_or_equal(mp, none) and not safer_or_equal(none, mp)
    assert safer_or_equal(both, mp) and not safer_or_equal(mp, both)
    assert not safer_or_equal(mp, mk) and not safer_or_equal(mk, mp)  # incomparable
    rpc = {"kv": "rpc", "log": "none"}
    assert safer_or_equal(rpc, mp) and safer_or_equal(rpc, mk) and not safer_or_equal(mp, rpc)
    assert not safer_or_equal(rpc, both) and not safer_or_equal(both, rpc)  # incomparable


def test_every_supported_configuration_runs_and_the_budget_picks():
    outcomes, notes = explore(requests=200, budget=1e-9)  # everything within budget
    names = {o.name for o in outcomes}
    assert {"kv=none,log=none", "kv=mprotect,log=mprotect", "kv=rpc,log=mprotect",
            "kv=rpc,log=rpc"} <= names
    assert all(o.requests_per_s > 0 for o in outcomes)
    safest = [o.name for o in outcomes if o.safest_in_budget]
    assert safest == ["kv=rpc,log=rpc"]  # a node of its own for each beats everything
    outcomes, _ = explore(requests=200, backends=("none", "mprotect"), budget=1e-9)
    assert [o.name for o in outcomes if o.safest_in_budget] == ["kv=mprotect,log=mprotect"]
    outcomes, _ = explore(requests=200, budget=1.0)  # only the fastest qualifies
    fastest = max(outcomes, key=lambda o: o.requests_per_s)  # which one is the machine's say
    assert [o.name for o in outcomes if o.safest_in_budget] == [fastest.name]
    assert any("budget" in n for n in notes)


def test_cli_json_and_plot(tmp_path):
    cfg = tmp_path / "e.toml"
    cfg.write_text("[workload]\nrequests = 100\n[explore]\nbackends = ['none', 'mprotect']\n")
    png = tmp_path / "e.png"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "explore", str(cfg), "--json",
                        "--plot", str(png)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["configurations"]) == 4
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("text,key", [
    ("[workload]\nrequests = 0\n", "workload.requests"),
    ("[explore]\nbackends = ['sgx']\n", "explore.backends"),
    ("[workload\n", "not valid TOML"),
])
def test_config_errors(tmp_path, text, key):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(TopologyError, match=key):
        load(p)
