"""`harness bench paging`: ExCache's page faults, each beside its floor, and a
cache-size sweep of a real numpy workload in the manner of LegoOS's table.

  miss_latency      a read of a page that lives on the mnode (clean victim).
                    Floor: a userfaultfd fault filled from a local buffer by the
                    same fault path, plus the transport's 4 KiB round trip
                    (ECHO of 4 KiB over an shm link between two processes);
                    floor_p50 is the sum of their medians.
  dirty_evict_miss  the same, when the victim is dirty: its write-back rides on
                    the miss request (piggyback). Same floor.
  zero_fill         first touch of a never-written page: filled locally.
                    Floor: the same fault path with a local store.
  minor_fault       first touch of plain anonymous memory (no floor: it is one).
  hit_access        a read of a page in the cache. Floor: the same read of
                    ordinary memory (both include one clock read, ~20 ns).
  slowdown_cache_N  the workload's time with a cache of N % of its working set
                    over its time on local memory (and _rdma: with the link
                    model set to LegoOS's RDMA figures).

The workload is a blocked matrix multiply, C += A @ B, on three 4096x4096
float64 matrices (384 MiB of working set) stored tile by tile (256x256 tiles,
each 512 KiB contiguous). It is blocked for the cache it is given, as a tuned
BLAS is for a CPU cache: a panel of B as wide as fits in 60 % of the cache
stays while every row of A streams past it. numpy's BLAS runs on one thread:
with two, each eviction's TLB shootdown (MADV_DONTNEED) costs ~70 us here."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from harness._native import excache as ex
from harness.bench import transport
from harness.bench.report import Report, Row, percentile
from harness.errors import HarnessError, NotSupported
from harness.nodes.cluster import open_cluster
from harness.topology import MODELS, LinkModel, Topology, load

Progress = Callable[[str], None]
N = 4096         # matrix side
TILE = 256       # tile side
NT = N // TILE   # tiles per side
TILE_PAGES = TILE * TILE * 8 // ex.PAGE
FRACTIONS = (12.5, 25, 50, 100)
LEGOOS = {14: 2.13, 28: 1.68, 57: 1.41}  # LegoOS's TensorFlow slowdowns (% cache: x)


def _topology(model: str) -> Topology:
    topo = load("lego3")
    lat, bw = MODELS[model]
    links = tuple(dataclasses.replace(k, model=LinkModel(lat, bw)) for k in topo.links)
    return dataclasses.replace(topo, links=links)


def _latency_rows(n: int, say: Progress) -> list[Row]:
    pages = n
    cache_pages = 256
    rows = []
    with open_cluster("lego3", cache=cache_pages * ex.PAGE) as c:
        cache = c.excache
        # Pages on the mnode: write them all (most get evicted dirty), flush the rest.
        r = c.alloc((pages + cache_pages) * ex.PAGE)
        r.time_touch(0, pages + cache_pages, write=True)
        cache.flush()  # now every resident line is clean
        say(f"miss_latency: {pages} misses with clean victims")
        miss = r.time_touch(0, pages)  # FIFO: none of these is resident
        say("dirty_evict_miss: misses that evict dirty lines")
        r.time_touch(pages, cache_pages, write=True)  # fill the cache with dirty lines
        before = cache.stats()["piggybacked"]
        dirty = r.time_touch(0, cache_pages)
        if cache.stats()["piggybacked"] - before != cache_pages:
            raise HarnessError("dirty_evict_miss: not every miss carried a dirty victim")
        say("zero_fill and hit_access")
        z = c.alloc(pages * ex.PAGE)
        zero = z.time_touch(0, min(pages, cache_pages))
        hit = z.time_touch(0, min(pages, cache_pages))  # all resident now
    say("floors: local-store faults, the transport's 4 KiB round trip, minor faults")
    local = ex.floor_fault("sigbus", pages)
    with transport._framed("shm") as lk:
        lk.bench_rpc_rtt(4096, 500)
        rtt = lk.bench_rpc_rtt(4096, pages)
    floor = percentile(local, 50) + percentile(rtt, 50)
    for metric, s in (("miss_latency", miss), ("dirty_evict_miss", dirty)):
        row = Row.of(metric, "ns", s)
        row.floor, row.floor_p50, row.ratio = "uffd_local_fault+rtt_4k", floor, row.p50 / floor
        rows.append(row)
    rows.append(Row.of("zero_fill", "ns", zero, "uffd_local_fault", local))
    rows.append(Row.of("minor_fault", "ns", ex.floor_minor_fault(pages)))
    rows.append(Row.of("hit_access", "ns", hit, "native_access",
                       ex.time_touch_native(len(hit))))
    return rows


def panel_width(cache_bytes: int | None) -> int:
    """Tiles of B kept per panel: as many columns as fit in 60 % of the cache."""
    if cache_bytes is None:
        return NT
    pages = cache_bytes // ex.PAGE * 6 // 10 - (NT + 4) * TILE_PAGES  # minus A's row, C
    return max(1, min(NT, pages // (NT * TILE_PAGES)))


def _matmul(a: np.ndarray, b: np.ndarray, c: np.ndarray, jp: int) -> None:
    for j0 in range(0, NT, jp):
        for i in range(NT):
            for j in range(j0, min(NT, j0 + jp)):
                acc = c[i, j]
                for k in range(NT):
                    acc += a[i, k] @ b[k, j]


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    """A and B, tiled: integer values, so float64 results are exact."""
    x = np.arange(N * N, dtype=np.float64).reshape(NT, TILE, NT, TILE).swapaxes(1, 2)
    return x % 7, x % 5


def _workload(buf, cache_bytes: int | None = None) -> float:
    """Fills A and B, zeroes C, multiplies; returns the multiply's seconds and
    checks two tiles of the answer against ordinary memory."""
    m = np.frombuffer(buf, dtype=np.float64, count=3 * N * N).reshape(3, NT, NT, TILE, TILE)
    a, b, c = m[0], m[1], m[2]
    a[:], b[:] = _inputs()
    c[:] = 0
    t0 = time.perf_counter()
    _matmul(a, b, c, panel_width(cache_bytes))
    dt = time.perf_counter() - t0
    la, lb = _inputs()
    for i, j in ((0, 0), (NT - 1, NT // 2)):
        want = sum(la[i, k] @ lb[k, j] for k in range(NT))
        if not np.array_equal(c[i, j], want):
            raise HarnessError("the workload computed a wrong answer on disaggregated memory")
    del a, b, c, m
    return dt


WORKING_SET = 3 * N * N * 8


def _sweep(rounds: int, say: Progress) -> tuple[list[Row], dict]:
    say(f"sweep: the workload on local memory ({WORKING_SET >> 20} MiB)")
    local = [_workload(bytearray(WORKING_SET)) for _ in range(rounds)]
    rows, curves = [], {}
    for model in ("none", "rdma"):
        curve = {}
        for frac in FRACTIONS:
            cache = int(WORKING_SET * frac / 100) // (64 * ex.PAGE) * (64 * ex.PAGE)
            say(f"sweep: cache {frac:g} % of {WORKING_SET >> 20} MiB, link model {model}")
            times = []
            with open_cluster(_topology(model), cache=cache) as c:
                for _ in range(rounds):
                    r = c.alloc(WORKING_SET)
                    times.append(_workload(r, cache))
                    c.free(r)
            slow = [t / percentile(local, 50) for t in times]
            curve[frac] = percentile(slow, 50)
            if frac != 100:
                suffix = "" if model == "none" else "_rdma"
                row = Row.of(f"slowdown_cache_{int(frac)}{suffix}", "x", slow)
                row.floor, row.floor_p50 = "local_memory", 1.0
                row.ratio = row.p50
                rows.append(row)
        curves[model] = curve
    return rows, curves


def plot(curves: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model, curve in curves.items():
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], marker="o",
                label=f"disagg-harness, link model {model}")
    ax.plot(list(LEGOOS), list(LEGOOS.values()), "k--s", label="LegoOS TensorFlow (paper)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("ExCache size (% of working set)")
    ax.set_ylabel("slowdown vs all-local memory")
    ax.set_title(f"Tiled matmul {N}x{N} on disaggregated memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(placement: str = "process", n: int = 2000, rounds: int = 3,
        plot_path: Path | None = None, progress: Progress | None = None) -> Report:
    if placement != "process":
        raise NotSupported("bench paging --placement vm needs links between VMs (ivshmem), "
                           "which this version does not have yet")
    say = progress or (lambda _m: None)
    from threadpoolctl import threadpool_limits

    rep = Report("paging")
    rep.rows += _latency_rows(n, say)
    with threadpool_limits(limits=1, user_api="blas"):
        rows, curves = _sweep(rounds, say)
    rep.rows += rows
    if plot_path is not None:
        rep.notes.append(f"plot: {plot(curves, plot_path)}")
    rep.notes.append(f"workload: tiled matmul {N}x{N} float64 ({TILE}x{TILE} tiles), "
                     f"{WORKING_SET >> 20} MiB; "
                     f"ExCache 64-way FIFO, SIGBUS fault path; {rounds} rounds per point")
    return rep
