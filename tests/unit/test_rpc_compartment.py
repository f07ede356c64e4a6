"""The rpc backend: a compartment in a node of its own, reached through an
RPC gate. Its heap has no address in the caller; code called through the gate
runs in the other process; errors and a dead node come back clearly."""

import os
import signal

import pytest

from harness.errors import HarnessError, IsolationFault, RemoteError
from harness.isolation import rpc_gate
from harness.isolation.compartments import Domain, parse

CONFIG = {"compartments": [{"name": "app", "backend": "mprotect", "heap": "64KiB"},
                           {"name": "kv", "backend": "rpc", "heap": "64KiB"}]}


def store(heap: memoryview, off: int, data: bytes) -> int:
    heap[off:off + len(data)] = data
    return os.getpid()


def load_bytes(heap: memoryview, off: int, n: int) -> bytes:
    return bytes(heap[off:off + n])


def fail() -> None:
    raise KeyError("inside kv")


@pytest.fixture
def domain():
    with Domain(parse(CONFIG, "<test>")) as d:
        yield d


def test_a_gate_call_runs_in_the_other_node_on_its_heap(domain):
    pid = domain.call("kv", rpc_gate.on_heap, store, 100, b"secret")
    assert pid == domain["kv"].pid != os.getpid()
    assert domain.call("kv", rpc_gate.on_heap, load_bytes, 100, 6) == b"secret"


def test_its_memory_cannot_be_touched_from_here(domain):
    with pytest.raises(IsolationFault, match=r"'app' cannot touch the memory of 'kv'.*"
                                             r"another node"):
        domain.probe("app", "kv")
    with pytest.raises(HarnessError, match="rpc compartment"):
        domain.enter("kv")
    with pytest.raises(HarnessError, match="inside an rpc compartment"):
        rpc_gate.heap()  # the caller has no such heap


def test_errors_cross_back_and_the_compartment_lives_on(domain):
    with pytest.raises(RemoteError, match="KeyError: 'inside kv'"):
        domain.call("kv", fail)
    with pytest.raises(HarnessError, match="module-level function"):
        domain.call("kv", lambda: 1)
    assert domain.call("kv", rpc_gate.on_heap, load_bytes, 0, 2) == b"\0\0"


def test_a_dead_node_is_a_clear_error_not_a_hang(domain):
    os.kill(domain["kv"].pid, signal.SIGKILL)
    with pytest.raises(HarnessError, match=r"'kv': its node \(pid \d+\) stopped answering"):
        domain.call("kv", rpc_gate.on_heap, load_bytes, 0, 1)


def test_closing_stops_the_node():
    d = Domain(parse(CONFIG, "<test>"))
    pid = d["kv"].pid
    d.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_function_from_main_is_refused_with_the_fix(domain):
    def f() -> None: ...
    f.__module__ = "__main__"
    with pytest.raises(HarnessError, match=r"defined in __main__.*move it into a module"):
        domain.call("kv", f)
