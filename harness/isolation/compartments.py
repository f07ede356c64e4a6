"""Compartments from a configuration file, and the probe that turns a
crossing into an IsolationFault.

    [[compartments]]
    name = "app"
    backend = "mprotect"   # none | mprotect | mpk | rpc
    heap = "1MiB"
    private_stack = false  # mpk only: the callee runs on a stack tagged with its key

The backend is chosen here, not in code. `mpk` needs protection keys
(pkey_alloc): a PKU CPU or a TCG guest with -cpu max. Where they are
missing, asking for mpk is an error: the harness never claims mpk where it
would have fallen back. `rpc` puts the compartment in another node (see
rpc_gate): its gate is an RPC, and what crosses it must be picklable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness._native import pkey
from harness.errors import HarnessError, IsolationFault, NotSupported, TopologyError
from harness.isolation.rpc_gate import RpcCompartment
from harness.topology import parse_size, read_toml

BACKENDS = ("none", "mprotect", "mpk", "rpc")


def available_backends() -> dict[str, bool]:
    """Which backends really work here."""
    return {"none": True, "mprotect": True, "mpk": pkey.pkey_available(), "rpc": True}


class Domain:
    """The compartments of one configuration, by name."""

    def __init__(self, specs: list[dict[str, Any]], source: str = "<config>") -> None:
        have = available_backends()
        self.compartments: dict[str, pkey.Compartment | RpcCompartment] = {}
        try:
            for s in specs:
                self.compartments[s["name"]] = self._make(s, have, source)
        except BaseException:
            self.close()  # no rpc compartment's node outlives a failed configuration
            raise

    @staticmethod
    def _make(s: dict[str, Any], have: dict[str, bool],
              source: str) -> pkey.Compartment | RpcCompartment:
        if not have[s["backend"]]:
            raise NotSupported(
                f"{source}: compartment {s['name']!r} asks for backend 'mpk', but "
                "pkey_alloc fails here (this CPU has no PKU); run it in a guest "
                "(`harness boot`, TCG -cpu max has protection keys) or choose 'mprotect'")
        if s["backend"] == "rpc":
            return RpcCompartment(s["name"], s["heap"])
        stack = 256 << 10 if s.get("private_stack") else 0  # room for SQLite (sqlbox)
        return pkey.Compartment(s["name"], s["backend"], s["heap"], stack)

    def __enter__(self) -> Domain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> pkey.Compartment | RpcCompartment:
        return self.compartments[name]

    def enter(self, name: str) -> None:
        c = self.compartments[name]
        if isinstance(c, RpcCompartment):
            raise HarnessError(f"compartment {name!r} is an rpc compartment: its code runs in "
                               f"its own node (pid {c.pid}); reach it through call()")
        c.enter()

    def call(self, callee: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs fn(*args) inside `callee`, through its gate."""
        c = self.compartments[callee]
        if isinstance(c, RpcCompartment) or not args:
            return c.call(fn, *args)
        return c.call(lambda: fn(*args))

    def probe(self, current: str, target: str, offset: int = 0, write: bool = False) -> None:
        """From inside `current`, touches `target`'s heap; raises
        IsolationFault naming both if the backend stopped it."""
        there = self.compartments[target]
        if isinstance(there, RpcCompartment):
            raise IsolationFault(
                f"compartment {current!r} cannot touch the memory of {target!r} (rpc): it "
                f"lives in another node (pid {there.pid}) and has no address here")
        self.enter(current)
        here = self.compartments[current]
        code = here.probe(there.address + offset, write)
        if code is not None:
            raise IsolationFault(
                f"compartment {current!r} ({here.backend}) touched the memory of "
                f"{target!r} ({there.backend}) at {there.address + offset:#x} "
                f"outside a gate: {code}")

    def close(self) -> None:
        pkey.leave_all()
        for c in self.compartments.values():
            if isinstance(c, RpcCompartment):
                c.close()


def parse(data: dict, source: str) -> list[dict[str, Any]]:
    specs, names = [], set()
    raw = data.get("compartments")
    if not isinstance(raw, list) or not raw:
        raise TopologyError(f"{source}: compartments: expected at least one "
                            "[[compartments]] table")
    for i, c in enumerate(raw):
        where = f"{source}: compartments[{i}]"
        extra = set(c) - {"name", "backend", "heap", "private_stack"}
        if extra:
            raise TopologyError(f"{where}.{sorted(extra)[0]}: expected one of the keys "
                                "name, backend, heap, private_stack")
        name = c.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise TopologyError(f"{where}.name: expected a unique name, got {name!r}")
        backend = c.get("backend", "none")
        if backend not in BACKENDS:
            renamed = " ('vm' is now 'rpc': a host process behind an RPC gate)" \
                if backend == "vm" else ""
            raise TopologyError(f"{where}.backend: expected one of {list(BACKENDS)}, "
                                f"got {backend!r}{renamed}")
        try:
            heap = parse_size(c.get("heap", "1MiB"))
        except ValueError:
            raise TopologyError(f"{where}.heap: expected a size such as 1MiB, "
                                f"got {c.get('heap')!r}") from None
        if heap <= 0 or heap % 4096:
            raise TopologyError(f"{where}.heap: expected a multiple of 4KiB, got {heap}")
        stack = c.get("private_stack", False)
        if not isinstance(stack, bool) or (stack and backend != "mpk"):
            raise TopologyError(f"{where}.private_stack: expected true only with backend "
                                f"'mpk', got {stack!r}")
        names.add(name)
        specs.append({"name": name, "backend": backend, "heap": heap, "private_stack": stack})
    return specs


def load(path: str | Path) -> Domain:
    return Domain(parse(read_toml(path), str(path)), str(path))
