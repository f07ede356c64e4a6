"""`harness bench paging [--placement process|vm]`: ExCache's page faults,
each beside its floor, and a cache-size sweep of a real numpy workload in the
manner of LegoOS's table.

  miss_latency      a read of a page that lives on the mnode (clean victim).
                    Floor: a userfaultfd fault filled from a local buffer by the
                    same fault path, plus the transport's 4 KiB round trip
                    (process placement: ECHO over an shm link between two
                    processes; vm: ECHO to the mnode over the pnode's own
                    ivshmem channel); floor_p50 is the sum of their medians.
  dirty_evict_miss  the same, when the victim is dirty: its write-back rides on
                    the miss request (piggyback). Same floor.
  zero_fill         first touch of a never-written page: filled locally.
                    Floor: the same fault path with a local store.
  minor_fault       first touch of plain anonymous memory (no floor: it is one).
  hit_access        a read of a page in the cache. Floor: the same read of
                    ordinary memory (both include one clock read, ~20 ns).
  slowdown_cache_N  the workload's time with a cache of N % of its working set
                    over its time on local memory, with LegoOS's pcache
                    prefetch (8 lines per miss); _noprefetch: one line per
                    miss; _rdma: with the link model set to LegoOS's RDMA
                    figures (process placement).

The latency rows use a cache without prefetch (one line per miss: a pure
miss). The workload is a blocked matrix multiply, C += A @ B, on three NxN
float64 matrices stored tile by tile (each tile contiguous): 4096x4096 with
256x256 tiles (384 MiB) on the host, 768x768 with 128x128 tiles (13.5 MiB) in
a TCG guest, where arithmetic is ~200x slower. It is blocked for the cache it
is given, as a tuned BLAS is for a CPU cache: a panel of B as wide as fits in
half the cache stays while every row of A streams past it. numpy's BLAS
runs on one thread: with two, each eviction's TLB shootdown (MADV_DONTNEED)
costs ~70 us here."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from harness._native import excache as ex
from harness.bench import transport
from harness.bench.report import Report, Row, percentile
from harness.errors import HarnessError
from harness.nodes.cluster import open_cluster
from harness.progress import Progress, silent
from harness.topology import MODELS, LinkModel, Topology, load

FRACTIONS = (12.5, 25, 50, 100)
LEGOOS = {14: 2.13, 28: 1.68, 57: 1.41}  # LegoOS's TensorFlow slowdowns (% cache: x)
PREFETCH = ex.DEFAULT_PREFETCH  # lines per miss in the sweep (LegoOS: CONFIG_PCACHE_PREFETCH)
LATENCY_CACHE_PAGES = 256


@dataclasses.dataclass(frozen=True)
class Matmul:
    """C += A @ B over three n x n float64 matrices stored tile by tile."""

    n: int
    tile: int

    @property
    def nt(self) -> int:
        return self.n // self.tile

    @property
    def tile_pages(self) -> int:
        return self.tile * self.tile * 8 // ex.PAGE

    @property
    def working_set(self) -> int:
        return 3 * self.n * self.n * 8

    def panel_width(self, cache_bytes: int | None) -> int:
        """Tiles of B kept per panel: as many columns as fit in half the cache.
        Under FIFO (hits are invisible), a panel filling a fraction x of the
        cache is fetched again after every (1 - x) cache-fulls of A streaming
        past, so the traffic goes as 1 / (x (1 - x)): least at x = 1/2."""
        if cache_bytes is None:
            return self.nt
        pages = cache_bytes // ex.PAGE // 2 - (self.nt + 4) * self.tile_pages
        return max(1, min(self.nt, pages // (self.nt * self.tile_pages)))

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """A and B, tiled: integer values, so float64 results are exact."""
        nt, t = self.nt, self.tile
        x = np.arange(self.n * self.n, dtype=np.float64).reshape(nt, t, nt, t).swapaxes(1, 2)
        return x % 7, x % 5

    def run(self, buf, cache_bytes: int | None = None) -> float:
        """Fills A and B, zeroes C, multiplies; returns the multiply's seconds
        and checks two tiles of the answer against ordinary memory."""
        nt, t = self.nt, self.tile
        m = np.frombuffer(buf, dtype=np.float64, count=3 * self.n * self.n)
        m = m.reshape(3, nt, nt, t, t)
        a, b, c = m[0], m[1], m[2]
        a[:], b[:] = self.inputs()
        c[:] = 0
        jp = self.panel_width(cache_bytes)
        t0 = time.perf_counter()
        for j0 in range(0, nt, jp):
            for i in range(nt):
                for j in range(j0, min(nt, j0 + jp)):
                    acc = c[i, j]
                    for k in range(nt):
                        acc += a[i, k] @ b[k, j]
        dt = time.perf_counter() - t0
        la, lb = self.inputs()
        for i, j in ((0, 0), (nt - 1, nt // 2)):
            want = sum(la[i, k] @ lb[k, j] for k in range(nt))
            if not np.array_equal(c[i, j], want):
                raise HarnessError("the workload computed a wrong answer on disaggregated memory")
        del a, b, c, m
        return dt


HOST = Matmul(4096, 256)
GUEST = Matmul(768, 128)


def _topology(model: str, name: str = "lego3") -> Topology:
    topo = load(name)
    lat, bw = MODELS[model]
    links = tuple(dataclasses.replace(k, model=LinkModel(lat, bw)) for k in topo.links)
    return dataclasses.replace(topo, links=links)


def _latency_rows(cache: ex.ExCache, rtt_4k: list[int], n: int, say: Progress) -> list[Row]:
    """The fault latencies on `cache` (LATENCY_CACHE_PAGES lines, no prefetch);
    rtt_4k is the same run's 4 KiB round trip for the miss floor."""
    if cache.prefetch != 1:  # a prefetched line would be timed as a "miss"
        raise HarnessError(f"the latency rows need a cache without prefetch, "
                           f"got prefetch={cache.prefetch}")
    pages, lines = n, LATENCY_CACHE_PAGES
    # Pages on the mnode: write them all (most get evicted dirty), flush the rest.
    r = cache.alloc((pages + lines) * ex.PAGE)
    r.time_touch(0, pages + lines, write=True)
    cache.flush()  # now every resident line is clean
    say(f"miss_latency: {pages} misses with clean victims")
    miss = r.time_touch(0, pages)  # FIFO: none of these is resident
    say("dirty_evict_miss: misses that evict dirty lines")
    r.time_touch(pages, lines, write=True)  # fill the cache with dirty lines
    before = cache.stats()["piggybacked"]
    dirty = r.time_touch(0, lines)
    if cache.stats()["piggybacked"] - before != lines:
        raise HarnessError("dirty_evict_miss: not every miss carried a dirty victim")
    say("zero_fill and hit_access")
    z = cache.alloc(pages * ex.PAGE)
    zero = z.time_touch(0, min(pages, lines))
    hit = z.time_touch(0, min(pages, lines))  # all resident now
    r.free()
    z.free()
    say("floors: local-store faults, minor faults, native reads")
    local = ex.floor_fault("sigbus", pages)
    floor = percentile(local, 50) + percentile(rtt_4k, 50)
    rows = []
    for metric, s in (("miss_latency", miss), ("dirty_evict_miss", dirty)):
        row = Row.of(metric, "ns", s)
        row.floor, row.floor_p50, row.ratio = "uffd_local_fault+rtt_4k", floor, row.p50 / floor
        rows.append(row)
    rows.append(Row.of("zero_fill", "ns", zero, "uffd_local_fault", local))
    rows.append(Row.of("minor_fault", "ns", ex.floor_minor_fault(pages)))
    rows.append(Row.of("hit_access", "ns", hit, "native_access",
                       ex.time_touch_native(len(hit))))
    return rows


def _cache_bytes(shape: Matmul, frac: float) -> int:
    return int(shape.working_set * frac / 100) // (64 * ex.PAGE) * (64 * ex.PAGE)


# A sweep runs the workload at each cache size; `runner(cache_bytes, prefetch)`
# returns a function that runs it once on fresh disaggregated memory.
Runner = Callable[[int, int], contextlib.AbstractContextManager[Callable[[], float]]]


def _sweep(shape: Matmul, variants: dict[str, tuple[str, Runner, int]], rounds: int,
           say: Progress) -> tuple[list[Row], dict]:
    """variants: row suffix -> (label, runner, prefetch); returns the rows and
    each variant's curve by label."""
    say(f"sweep: the workload on local memory ({shape.working_set >> 20} MiB)")
    local = percentile([shape.run(bytearray(shape.working_set)) for _ in range(rounds)], 50)
    rows, curves = [], {}
    for suffix, (label, runner, prefetch) in variants.items():
        curve = {}
        for frac in FRACTIONS:
            cache = _cache_bytes(shape, frac)
            say(f"sweep: cache {frac:g} % of {shape.working_set >> 20} MiB, {label}")
            with runner(cache, prefetch) as once:
                slow = [once() / local for _ in range(rounds)]
            curve[frac] = percentile(slow, 50)
            if frac != 100:
                row = Row.of(f"slowdown_cache_{int(frac)}{suffix}", "x", slow)
                row.floor, row.floor_p50, row.ratio = "local_memory", 1.0, row.p50
                rows.append(row)
        curves[label] = curve
    return rows, curves


def _replication_rows(rows: list[Row]) -> list[Row]:
    """What replicating the mnode costs: the replicated run's time over the
    plain one's at each cache size (LegoOS: 2-23 %)."""
    by = {r.metric: r for r in rows}
    out = []
    for frac in FRACTIONS[:-1]:
        metric = f"slowdown_cache_{int(frac)}"
        plain, repl = by[metric], by[f"{metric}_replicated"]
        row = Row.of(f"replication_overhead_{int(frac)}", "x", [repl.p50 / plain.p50])
        row.floor, row.floor_p50, row.ratio = "unreplicated", 1.0, row.p50
        out.append(row)
    return out


def _host_runner(model: str, topology: str = "lego3") -> Runner:
    @contextlib.contextmanager
    def runner(cache: int, prefetch: int):
        with open_cluster(_topology(model, topology), cache=cache, prefetch=prefetch) as c:
            def once() -> float:
                r = c.alloc(HOST.working_set)
                try:
                    return HOST.run(r, cache)
                finally:
                    c.free(r)
            yield once
    return runner


def plot(curves: dict, path: Path, shape: Matmul = HOST, placement: str = "process") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model, curve in curves.items():
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], marker="o", label=f"disagg-harness: {model}")
    ax.plot(list(LEGOOS), list(LEGOOS.values()), "k--s", label="LegoOS TensorFlow (paper)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("ExCache size (% of working set)")
    ax.set_ylabel("slowdown vs all-local memory")
    ax.set_title(f"Tiled matmul {shape.n}x{shape.n} on disaggregated memory ({placement})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_here(n: int = 2000, rounds: int = 3, say: Progress = silent
             ) -> tuple[Report, dict]:
    """Process placement: the workload in this process, the mnode a process."""
    rep = Report("paging")
    with open_cluster("lego3", cache=LATENCY_CACHE_PAGES * ex.PAGE, prefetch=1) as c:
        with transport._framed("shm") as lk:
            lk.bench_rpc_rtt(4096, 500)
            rtt = lk.bench_rpc_rtt(4096, n)
        rep.rows += _latency_rows(c.excache, rtt, n, say)
    variants = {"": (f"shm link, prefetch {PREFETCH}", _host_runner("none"), PREFETCH),
                "_noprefetch": ("shm link, no prefetch", _host_runner("none"), 1),
                "_rdma": (f"RDMA link model, prefetch {PREFETCH}", _host_runner("rdma"),
                          PREFETCH),
                "_replicated": (f"shm link, prefetch {PREFETCH}, mnode replicated (lego3r)",
                                _host_runner("none", "lego3r"), PREFETCH)}
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        rows, curves = _sweep(HOST, variants, rounds, say)
    rep.rows += rows + _replication_rows(rows)
    rep.notes.append(f"workload: tiled matmul {HOST.n}x{HOST.n} float64 ({HOST.tile}x"
                     f"{HOST.tile} tiles), {HOST.working_set >> 20} MiB; ExCache 64-way FIFO, "
                     f"SIGBUS fault path, prefetch {PREFETCH} lines per miss unless "
                     f"_noprefetch; {rounds} rounds per point")
    return rep, curves


def run_in_guest(n: int = 1000, rounds: int = 1, say: Progress = silent
                 ) -> tuple[Report, dict]:
    """On a pnode guest: the workload here, its memory on the mnode guest over
    ivshmem. (The link model is applied by the sender, so there is no _rdma
    variant: the mnode guest would not apply it to its replies.)"""
    from harness.nodes.guest import excache_link, open_excache

    link = excache_link()
    rep = Report("paging", placement="vm")
    link.bench_rpc_rtt(4096, 200)
    rtt = link.bench_rpc_rtt(4096, n)
    cache = open_excache(LATENCY_CACHE_PAGES * ex.PAGE, prefetch=1, link=link)  # pure misses
    rep.rows += _latency_rows(cache, rtt, n, say)
    del cache

    @contextlib.contextmanager
    def runner(size: int, prefetch: int):
        c = open_excache(size, prefetch=prefetch, link=link)  # capped at one line per set

        def once() -> float:
            r = c.alloc(GUEST.working_set)
            try:
                return GUEST.run(r, size)
            finally:
                r.free()
        yield once

    variants = {"": (f"ivshmem, prefetch {PREFETCH}", runner, PREFETCH),
                "_noprefetch": ("ivshmem, no prefetch", runner, 1)}
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        rows, curves = _sweep(GUEST, variants, rounds, say)
    rep.rows += rows
    rep.notes.append(f"workload: tiled matmul {GUEST.n}x{GUEST.n} float64 ({GUEST.tile}x"
                     f"{GUEST.tile} tiles), {GUEST.working_set >> 20} MiB, in the pnode guest; "
                     f"ExCache 64-way FIFO over ivshmem to the mnode guest, prefetch at most one "
                     f"line per set (6 at 12.5 %); {rounds} rounds")
    return rep, curves


def run(placement: str = "process", n: int = 2000, rounds: int = 3,
        plot_path: Path | None = None, progress: Progress | None = None) -> Report:
    say = progress or silent
    if placement == "process":
        rep, curves = run_here(n, rounds, say)
        shape = HOST
    else:
        rep, curves = _run_vm(n, rounds, say)
        shape = GUEST
    if plot_path is not None:
        rep.notes.append(f"plot: {plot(curves, plot_path, shape, rep.placement)}")
    return rep


def _run_vm(n: int, rounds: int, say: Progress) -> tuple[Report, dict]:
    import sys

    from harness.guest_run import guest_json
    from harness.vm import accel

    say("booting lego3 with every node in a VM")
    with open_cluster("lego3", placement="vm", timeout=300, progress=say) as c:
        say("the benchmark runs in the pnode guest (a few minutes under TCG)")
        raw = guest_json([sys.executable, "-m", "harness.bench.paging", "-n", str(n),
                          "--rounds", str(rounds)], "the paging benchmark", cluster=c,
                         timeout=1800)
    rep = Report.from_json(raw)
    rep.accel = accel.probe().accel
    return rep, {k: {float(f): v for f, v in curve.items()} for k, curve in raw["curves"].items()}


def main(argv: list[str]) -> int:
    """In a pnode guest: `python -m harness.bench.paging [-n N] [--rounds R]`
    prints the report and the sweep's curves as JSON."""
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=1)
    a = p.parse_args(argv)
    rep, curves = run_in_guest(a.n, a.rounds)
    print(json.dumps({**json.loads(rep.to_json()), "notes": rep.notes, "curves": curves}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
