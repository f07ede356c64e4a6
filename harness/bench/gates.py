"""`harness bench gates`: a gate round trip into another compartment, for
each backend this host (or guest) really has, beside its floor in the same
run, their samples taken in alternating parts. Each sample is the mean of
100 round trips (the clocks cost more than a call); rows come in TSC cycles
and in ns.

  gate_none       floor: an indirect call of the same empty function
  gate_mprotect   floor: the four mprotect calls the round trip makes
  gate_mpk_light  floor: two checked WRPKRUs around the call
  gate_mpk_stack  (callee on its private stack) same floor
  gate_rpc        the callee in another process, the gate an RPC over the
                  transport; floor: the transport's 64 B round trip

mpk rows appear only where protection keys work: on this project's build
machine that is a TCG guest (`--placement vm`), where the cycle counts are
TCG's, not a CPU's."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from harness._native import pkey
from harness.bench import transport
from harness.bench.report import Report, Row
from harness.progress import Progress, silent


def _rows(metric: str, floor: str, s: tuple, f: tuple) -> list[Row]:
    return [Row.of(metric, "cycles", s[0], floor, f[0]),
            Row.of(f"{metric}_ns", "ns", s[1], floor, f[1])]


def _paired(gate: Callable[[int], tuple], floor: Callable[[int], tuple], n: int,
            parts: int = 20) -> tuple[tuple, tuple]:
    """n samples of a gate and of its floor, taken in alternating parts, so
    a change of the machine's pace during the run (another tenant, the
    clock) falls on both alike instead of on whichever ran second."""
    g: tuple[list, list] = ([], [])
    f: tuple[list, list] = ([], [])
    for i in range(min(parts, n)):
        k = n // parts + (i < n % parts) if n >= parts else 1
        for out, fn in ((g, gate), (f, floor)):
            for acc, got in zip(out, fn(k), strict=True):
                acc.extend(got)
    return g, f


def run_here(n: int = 2000, progress: Progress | None = None) -> Report:
    say = progress or silent
    rep = Report("gates")
    say("gate_none")
    none = pkey.Compartment("none", "none", 1 << 16)
    rep.rows += _rows("gate_none", "function_call", *_paired(none.bench_gate, pkey.floor_call, n))
    say("gate_mprotect")
    a = pkey.Compartment("caller", "mprotect", 1 << 16)
    b = pkey.Compartment("callee", "mprotect", 1 << 16)
    a.enter()
    try:
        gate = b.bench_gate(max(n // 10, 50))
        floor = pkey.floor_mprotect(a, b, max(n // 10, 50))
    finally:
        pkey.leave_all()
    rep.rows += _rows("gate_mprotect", "mprotect_x4", gate, floor)
    if pkey.pkey_available():
        say("gate_mpk_light and gate_mpk_stack")
        m = pkey.Compartment("mpk", "mpk", 1 << 16, 64 << 10)
        light, wr = _paired(m.bench_gate, pkey.floor_wrpkru_pair, n)
        rep.rows += _rows("gate_mpk_light", "wrpkru_pair+call", light, wr)
        rep.rows += _rows("gate_mpk_stack", "wrpkru_pair+call", m.bench_gate(n, True), wr)
    else:
        rep.notes.append("no mpk rows: pkey_alloc fails here (no PKU); run with "
                         "--placement vm for a TCG guest that has protection keys")
    say("gate_rpc")
    with transport._framed("shm") as link:
        link.bench_rpc_rtt(64, 500)
        gate = [float(x) for x in link.bench_gate_call(n)]
        floor = [float(x) for x in link.bench_rpc_rtt(64, n)]
    rep.rows.append(Row.of("gate_rpc_ns", "ns", gate, "rtt_64", floor))
    return rep


def run(placement: str = "process", n: int = 2000, deterministic: bool = False,
        progress: Progress | None = None) -> Report:
    if placement == "process":
        return run_here(n, progress)
    from harness.guest_run import guest_json
    from harness.vm import accel

    rep = Report.from_json(guest_json([sys.executable, "-m", "harness.bench.gates", "-n", str(n)],
                                      "the gate benchmark", deterministic=deterministic,
                                      progress=progress))
    rep.placement, rep.accel = "vm", accel.probe().accel
    rep.notes.append("in a guest" + (" with -icount (deterministic)" if deterministic else ""))
    return rep


def main(argv: list[str]) -> int:
    """In a guest: `python -m harness.bench.gates [-n N]` prints JSON."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=2000)
    rep = run_here(p.parse_args(argv).n)
    print(json.dumps({**json.loads(rep.to_json()), "notes": rep.notes}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
