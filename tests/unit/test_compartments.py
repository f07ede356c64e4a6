"""Compartments and gates on the host: the mprotect backend really revokes
access, a gate switches both ways, a violation kills with SEGV_ACCERR, and
mpk is refused (never faked) where the CPU has no protection keys."""

import subprocess
import sys
import textwrap

import pytest

from harness._native import pkey
from harness.errors import IsolationFault, NotSupported, TopologyError
from harness.isolation.compartments import Domain, available_backends, load, parse

TWO = {"compartments": [{"name": "app", "backend": "mprotect", "heap": "64KiB"},
                        {"name": "kv", "backend": "mprotect", "heap": "64KiB"}]}


@pytest.fixture
def domain():
    d = Domain(parse(TWO, "<test>"))
    yield d
    d.close()


def test_outside_a_gate_the_other_heap_faults(domain):
    with pytest.raises(IsolationFault, match=r"'app' \(mprotect\) touched the memory of 'kv'.*"
                                             r"SEGV_ACCERR"):
        domain.probe("app", "kv")
    domain.probe("app", "app", write=True)  # its own heap is fine


def test_a_gate_switches_rights_both_ways(domain):
    kv = domain["kv"]
    domain.enter("app")

    def store() -> str:
        memoryview(kv)[0] = 42  # allowed: we are inside kv now
        return "stored"

    assert domain.call("kv", store) == "stored"
    assert domain["app"].probe(kv.address) == "SEGV_ACCERR"  # and revoked again after


def test_an_exception_inside_the_callee_comes_out_after_the_switch_back(domain):
    domain.enter("app")

    def boom() -> None:
        raise KeyError("inside kv")

    with pytest.raises(KeyError, match="inside kv"):
        domain.call("kv", boom)
    assert domain["app"].probe(domain["kv"].address) == "SEGV_ACCERR"


def test_leaving_restores_the_shared_view(domain):
    domain.enter("app")
    domain.close()
    memoryview(domain["kv"])[1] = 7  # no fault


VIOLATOR = textwrap.dedent("""
    from harness._native import pkey
    a = pkey.Compartment("a", "mprotect", 1 << 16)
    b = pkey.Compartment("b", "mprotect", 1 << 16)
    pkey.segv_report_install()
    a.enter()
    memoryview(b)[0] = 1
    print("NOT REACHED", flush=True)
""")


def test_a_violating_process_dies_of_sigsegv_with_accerr():
    p = subprocess.run([sys.executable, "-c", VIOLATOR], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == -11 and "NOT REACHED" not in p.stdout
    assert "dh: SIGSEGV si_code=2" in p.stderr  # SEGV_ACCERR


def test_mpk_is_never_claimed_without_protection_keys():
    if pkey.pkey_available():
        pytest.skip("this host has PKU; the guest test covers mpk")
    assert available_backends() == {"none": True, "mprotect": True, "mpk": False, "rpc": True}
    with pytest.raises(NotSupported, match="pkey_alloc fails here"):
        Domain(parse({"compartments": [{"name": "x", "backend": "mpk"}]}, "<test>"))
    with pytest.raises(NotSupported):
        pkey.floor_wrpkru_pair(10)


@pytest.mark.parametrize("bad,key", [
    ({"compartments": [{"name": "x", "backend": "sgx"}]}, "backend"),
    ({"compartments": [{"name": "x", "backend": "vm"}]}, "'vm' is now 'rpc'"),
    ({"compartments": [{"name": "x", "heap": "1000"}]}, "heap"),
    ({"compartments": [{"name": "x", "private_stack": True}]}, "private_stack"),
    ({"compartments": [{"name": "x"}, {"name": "x"}]}, "name"),
    ({"compartments": [{"name": "x", "colour": 1}]}, "colour"),
    ({}, "compartments"),
])
def test_config_errors_name_the_key(bad, key):
    with pytest.raises(TopologyError, match=key):
        parse(bad, "c.toml")


def test_config_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[[compartments]]\nname = "a"\nbackend = "none"\n')
    d = load(p)
    assert d["a"].backend == "none"
    d.close()
    (tmp_path / "bad.toml").write_text("[[compartments]\n")
    with pytest.raises(TopologyError, match="not valid TOML"):
        load(tmp_path / "bad.toml")
