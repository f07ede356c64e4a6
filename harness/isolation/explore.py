"""`harness explore CONFIG`: design-space exploration in FlexOS's manner.

A workload is split into components: an application that serves requests, a
key-value store holding secret data in its heap, and a logger. Every
assignment of the store and the logger to a backend this host really has
(`none`: in the application's compartment; `mprotect`; `mpk`; `rpc`: in a
node of its own) is built, run and measured. Configuration A is safer than B
when every component is at least as isolated in A (none < mprotect, mpk < rpc:
mprotect and mpk share the address space and are not ranked against each
other), which orders the configurations only partially. The
safest configurations whose throughput stays within the budget (a fraction
of the fastest one) are marked, as a table and a PNG.

    [workload]
    requests = 2000          # per configuration
    value_bytes = 64
    [explore]
    backends = ["none", "mprotect", "mpk", "rpc"]   # those the host lacks are skipped, and said so
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import TopologyError
from harness.isolation import rpc_gate
from harness.isolation.compartments import BACKENDS, Domain, available_backends
from harness.topology import read_toml

COMPONENTS = ("kv", "log")  # the application is the caller, always compartment "app"
LEVEL = {"none": 0, "mprotect": 1, "mpk": 1, "rpc": 2}
SHARED_SPACE = ("mprotect", "mpk")  # mechanisms within the application's address space


@dataclass
class Outcome:
    assignment: dict[str, str]
    requests_per_s: float
    safest_in_budget: bool = False
    dominated_by: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return ",".join(f"{c}={b}" for c, b in self.assignment.items())


def safer_or_equal(a: dict[str, str], b: dict[str, str]) -> bool:
    """Is every component at least as isolated in a as in b? (Same backend,
    or a higher level: mprotect and mpk share one and are not ranked.)"""
    return all(a[c] == b[c] or LEVEL[a[c]] > LEVEL[b[c]] for c in COMPONENTS)


# The components' code: module-level, so an rpc compartment's node can import it.
def kv_put(heap: memoryview, i: int, value: bytes) -> None:
    off = (i % (len(heap) // len(value))) * len(value)
    heap[off:off + len(value)] = value


def log_put(heap: memoryview, i: int) -> None:
    heap[(i * 8) % (len(heap) - 8):][:8] = i.to_bytes(8, "little")


def _run(assignment: dict[str, str], requests: int, value: int) -> float:
    app_backend = next((b for b in assignment.values() if b in SHARED_SPACE), "none")
    specs = [{"name": "app", "backend": app_backend, "heap": 1 << 16, "private_stack": False}]
    specs += [{"name": c, "backend": b, "heap": 1 << 20, "private_stack": False}
              for c, b in assignment.items() if b != "none"]
    secret = (bytes(range(256)) * (value // 256 + 1))[:value]
    with Domain(specs, "<explore>") as d:
        heaps = {c: memoryview(d[c] if b in SHARED_SPACE else d["app"])
                 for c, b in assignment.items() if b != "rpc"}

        def call(component: str, fn, *args) -> None:
            backend = assignment[component]
            if backend == "none":
                fn(heaps[component], *args)  # same compartment: a plain call
            elif backend == "rpc":
                d.call(component, rpc_gate.on_heap, fn, *args)
            else:
                d.call(component, fn, heaps[component], *args)

        try:
            d.enter("app")
            t0 = time.perf_counter()
            for i in range(requests):
                call("kv", kv_put, i, secret)
                call("log", log_put, i)
            return requests / (time.perf_counter() - t0)
        finally:
            for h in heaps.values():
                h.release()


def explore(requests: int = 2000, value: int = 64, backends: tuple[str, ...] = BACKENDS,
            budget: float = 0.5) -> tuple[list[Outcome], list[str]]:
    have = available_backends()
    usable = [b for b in backends if have.get(b)]
    notes = [f"backend {b!r} skipped: not available here" for b in backends if not have.get(b)]
    if "none" not in usable:
        usable.insert(0, "none")
    outcomes = []
    for combo in itertools.product(usable, repeat=len(COMPONENTS)):
        assignment = dict(zip(COMPONENTS, combo, strict=True))
        if len({b for b in combo if b in SHARED_SPACE}) > 1:
            continue  # one mechanism per address space (see the note)
        outcomes.append(Outcome(assignment, _run(assignment, requests, value)))
    best = max(o.requests_per_s for o in outcomes)
    within = [o for o in outcomes if o.requests_per_s >= budget * best]
    for o in outcomes:
        o.dominated_by = [p.name for p in outcomes if p is not o and
                          safer_or_equal(p.assignment, o.assignment) and
                          not safer_or_equal(o.assignment, p.assignment)]
    for o in within:
        o.safest_in_budget = not any(
            p is not o and safer_or_equal(p.assignment, o.assignment) and
            not safer_or_equal(o.assignment, p.assignment) for p in within)
    if len([b for b in usable if b in SHARED_SPACE]) > 1:
        notes.append("assignments mixing mprotect and mpk are skipped: the application's "
                     "compartment uses one mechanism")
    notes.append(f"budget: at least {budget:.0%} of the fastest ({best:,.0f} requests/s)")
    return outcomes, notes


def load(path: str | Path) -> dict:
    data = read_toml(path)
    w, e = data.get("workload", {}), data.get("explore", {})
    requests, value = w.get("requests", 2000), w.get("value_bytes", 64)
    for key, v in (("workload.requests", requests), ("workload.value_bytes", value)):
        if not isinstance(v, int) or v < 1:
            raise TopologyError(f"{path}: {key}: expected a positive integer, got {v!r}")
    backends = e.get("backends", list(BACKENDS))
    if not isinstance(backends, list) or not set(backends) <= set(LEVEL):
        raise TopologyError(f"{path}: explore.backends: expected a list from {list(LEVEL)}, "
                            f"got {backends!r}")
    return {"requests": requests, "value": value, "backends": tuple(backends)}


def plot(outcomes: list[Outcome], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for o in outcomes:
        safety = sum(LEVEL[o.assignment[c]] for c in COMPONENTS)
        ax.scatter(safety, o.requests_per_s, s=80, marker="*" if o.safest_in_budget else "o",
                   color="tab:red" if o.safest_in_budget else "tab:blue")
        ax.annotate(o.name, (safety, o.requests_per_s), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("isolation (sum over components: none 0, mprotect/mpk 1, rpc 2)")
    ax.set_xticks(range(2 * len(COMPONENTS) + 1))
    ax.set_yscale("log")
    ax.set_ylabel("requests per second")
    ax.set_title("Design space: safety against throughput (red: safest within budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_json(outcomes: list[Outcome], notes: list[str]) -> dict:
    return {"configurations": [{"assignment": o.assignment, "requests_per_s": o.requests_per_s,
                                "safest_in_budget": o.safest_in_budget,
                                "dominated_by": o.dominated_by} for o in outcomes],
            "notes": notes}


def main(argv: list[str]) -> int:
    """In a guest: `python -m harness.isolation.explore CONFIG [--budget F]` prints JSON."""
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--budget", type=float, default=0.5)
    a = p.parse_args(argv)
    cfg = load(a.config)
    print(json.dumps(to_json(*explore(cfg["requests"], cfg["value"], cfg["backends"],
                                      a.budget))))
    return 0


if __name__ == "__main__":
    import sys

    # Through the imported module, so the components' functions are named
    # harness.isolation.explore.*, which an rpc compartment's node can import.
    from harness.isolation import explore as this

    sys.exit(this.main(sys.argv[1:]))
