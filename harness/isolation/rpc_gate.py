"""The `rpc` backend: a compartment whose code and heap live in another node,
reached through a gate that is an RPC over the transport (FlexOS's EPT
backend, in the harness's terms: a separate address space, so there is no
address the caller could even try to touch).

The node is a process of its own on this host, joined by a shm link. What
crosses the gate is a function and its arguments, pickled: a module-level
function travels by its qualified name and the callee imports it, so only
code the callee could import runs there. Code running in the callee reaches
the compartment's heap with `heap()`.

    python -m harness.isolation.rpc_gate SHM_PATH HEAP_BYTES PARENT_PID
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

from harness._native.transport import Link, Op, create_shm_file
from harness.errors import HarnessError, LinkClosed, RemoteError, TransportTimeout

_heap: memoryview | None = None


def heap() -> memoryview:
    """The compartment's heap, for code running inside it (in the callee)."""
    if _heap is None:
        raise HarnessError("heap() is for code running inside an rpc compartment, "
                           "called through its gate")
    return _heap


def on_heap(fn: Callable[..., Any], *args: Any) -> Any:
    """Runs fn(heap(), *args) in the callee: lets one function serve a
    compartment of any backend, given its heap."""
    return fn(heap(), *args)


class RpcCompartment:
    """A compartment in another node. `call(fn, *args)` is its gate."""

    backend = "rpc"

    def __init__(self, name: str, heap_bytes: int, timeout: float = 30.0) -> None:
        self.name = name
        self.timeout = timeout
        self._dir = tempfile.mkdtemp(dir="/dev/shm", prefix="dh-rpcgate-")
        path = os.path.join(self._dir, "gate.shm")
        create_shm_file(path, 4 << 20)
        self._link = Link.shm_open(path, 0, name=f"compartment {name!r}")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "harness.isolation.rpc_gate", path, str(heap_bytes),
             str(os.getpid())], stdin=subprocess.DEVNULL)
        try:
            self._link.call(Op.PING, timeout=timeout)
        except (LinkClosed, TransportTimeout):
            self.close()
            raise HarnessError(f"compartment {name!r}: its node (pid {self._proc.pid}) did "
                               f"not come up within {timeout:g} s (exit status "
                               f"{self._proc.poll()}); see its stderr above") from None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if any(getattr(f, "__module__", None) == "__main__" for f in (fn, *args) if callable(f)):
            raise HarnessError(f"compartment {self.name!r} is an rpc compartment: {fn!r} is "
                               "defined in __main__, which its node cannot import; move it "
                               "into a module")
        try:
            payload = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise HarnessError(f"compartment {self.name!r} is an rpc compartment: what crosses "
                               f"its gate must be a module-level function and picklable "
                               f"arguments ({e})") from None
        if len(payload) > self._link.max_payload:
            raise HarnessError(f"compartment {self.name!r}: a gate call carries at most "
                               f"{self._link.max_payload} bytes, this one {len(payload)}")
        try:
            reply = self._link.call(Op.GATE_CALL, payload, timeout=self.timeout)
        except RemoteError as e:
            raise RemoteError(f"in rpc compartment {self.name!r}: {e}") from None
        except (LinkClosed, TransportTimeout) as e:
            raise HarnessError(f"rpc compartment {self.name!r}: its node (pid {self.pid}) "
                               f"stopped answering: {e}") from None
        return pickle.loads(reply)

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._link.call(Op.SHUTDOWN, timeout=5.0)
                self._proc.wait(5.0)
            except (HarnessError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._link.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def serve(link: Link) -> None:
    """The callee's loop: one gate call at a time, as a compartment runs."""
    while True:
        hdr, payload = link.recv(timeout=None)  # dies with its parent (PDEATHSIG)
        if hdr.opcode == Op.SHUTDOWN:
            link.reply(hdr)
            return
        if hdr.opcode == Op.PING:
            link.reply(hdr)
            continue
        if hdr.opcode != Op.GATE_CALL:
            link.reply(hdr, f"unexpected opcode {hdr.opcode:#x}".encode(), error=True)
            continue
        try:
            fn, args = pickle.loads(payload)
            out = pickle.dumps(fn(*args), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # the caller gets the traceback; the compartment lives on
            link.reply(hdr, traceback.format_exc(limit=4).encode(), error=True)
            continue
        link.reply(hdr, out)


def main(argv: list[str]) -> int:
    import mmap

    from harness.isolation import rpc_gate  # not __main__: the module gate calls import
    from harness.procs import die_with_parent

    path, size, parent = argv[0], int(argv[1]), int(argv[2])
    die_with_parent(parent)
    rpc_gate._heap = memoryview(mmap.mmap(-1, size))
    rpc_gate.serve(Link.shm_open(path, 1, name="rpc compartment"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
