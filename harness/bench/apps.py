"""`harness bench apps [--placement process|vm]`: real programs nobody here
wrote, unmodified, with their anonymous memory on the mnode behind an ExCache
of 12.5, 25 and 50 % of their own peak, beside the same program on local
memory in the same run (LegoOS's TensorFlow: 2.13 / 1.68 / 1.41x at about
14 / 28 / 57 %).

  app_<name>_slowdown_12|25|50  remote time over local time of the same round
                    (p50 and p99 over rounds); floor: the same program on
                    local memory, floor_p50 its median seconds; ratio: the
                    slowdown
  app_redis_rps_local, app_redis_rps_25
                    redis-benchmark's SET+GET requests per second (the 25 %
                    row's floor is the local one)
  app_numpy2t_vs_1t_25
                    median 2-thread slowdown at 25 % over the median 1-thread
                    slowdown at 25 % (floor_p50: the 1-thread slowdown): what
                    threads cost on disaggregated memory

Each app runs once on local memory first (its peak RssAnon sets the cache
sizes, rounded down to 64 pages); then every round runs it locally and at
each cache size, in an order that rotates, so the machine's drift falls on
local and remote runs alike. Every remote run must reproduce the local run's
exit status and checksums (apps_workloads says what each checks), or the
benchmark stops with an error naming the app and the cache size.

A remote run is stopped after `budget` times its app's local wall time (at
least a minute) and counted as having taken that long; later runs with that
cache or a smaller one are not started and are counted the same. The report's
notes name every row that holds such a lower bound, and the plot marks it."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bench.apps_workloads import GUEST, HOST, Outcome, Scale, Workload, workloads
from harness.bench.report import Report, Row, percentile
from harness.errors import HarnessError
from harness.progress import Progress, silent
from harness.text import tail

FRACTIONS = (12.5, 25, 50)
LEGOOS = {14: 2.13, 28: 1.68, 57: 1.41}  # LegoOS's TensorFlow slowdowns (% cache: x)
LINE = 64 * 4096  # cache sizes are multiples of 64 pages
FLOOR = "same program on local memory"
MIN_BUDGET = 60.0  # seconds: no remote run is stopped sooner


def cache_for(peak: int, frac: float) -> int:
    """frac % of peak bytes, rounded down to 64 pages, at least 64 pages."""
    return max(LINE, int(peak * frac / 100) // LINE * LINE)


def suffix(frac: float) -> str:
    return str(int(frac))  # 12.5 -> "12"


def order(round_: int) -> list[float]:
    """The cache sizes of one round, rotated so none always follows the local run."""
    k = round_ % len(FRACTIONS)
    return list(FRACTIONS[k:] + FRACTIONS[:k])


@dataclass
class Measured:
    """One app's times: local[i] and remote[frac][i] come from round i."""

    name: str
    peak: int
    local: list[float] = field(default_factory=list)
    remote: dict[float, list[float]] = field(default_factory=dict)
    rps_local: list[float] = field(default_factory=list)
    rps_remote: dict[float, list[float]] = field(default_factory=dict)
    capped: dict[float, int] = field(default_factory=dict)  # runs stopped at the budget

    def slowdowns(self, frac: float) -> list[float]:
        return [r / lo for lo, r in zip(self.local, self.remote[frac], strict=True)]


def slowdown_rows(m: Measured) -> list[Row]:
    floor = percentile(m.local, 50)
    rows = []
    for frac in FRACTIONS:
        if m.remote.get(frac):
            row = Row.of(f"app_{m.name}_slowdown_{suffix(frac)}", "x", m.slowdowns(frac))
            row.floor, row.floor_p50, row.ratio = FLOOR, floor, row.p50
            rows.append(row)
    return rows


def rps_rows(m: Measured) -> list[Row]:
    if not m.rps_local:
        return []
    rows = [Row.of(f"app_{m.name}_rps_local", "req/s", m.rps_local)]
    if m.rps_remote.get(25):
        rows.append(Row.of(f"app_{m.name}_rps_25", "req/s", m.rps_remote[25], FLOOR,
                           m.rps_local))
    return rows


def threads_row(one: Measured, two: Measured) -> Row:
    s1 = percentile(one.slowdowns(25), 50)
    v = percentile(two.slowdowns(25), 50) / s1
    return Row("app_numpy2t_vs_1t_25", "x", v, v, 1, "numpy1t slowdown at 25 %", s1, v)


def rows_of(measured: dict[str, Measured]) -> list[Row]:
    rows: list[Row] = []
    for m in measured.values():
        rows += slowdown_rows(m) + rps_rows(m)
    one, two = measured.get("numpy1t"), measured.get("numpy2t")
    if one and two and one.remote.get(25) and two.remote.get(25):
        rows.append(threads_row(one, two))
    return rows


def capped_notes(measured: dict[str, Measured], budget: float) -> list[str]:
    return [f"app_{m.name}_slowdown_{suffix(f)}: {n} of {len(m.remote[f])} runs stopped at "
            f"the budget ({budget:g}x the local time, at least {MIN_BUDGET:g} s) or were "
            f"skipped after one did; counted as that: a lower bound"
            for m in measured.values() for f, n in m.capped.items() if n]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


class _Runner:
    """Runs one workload on the cluster and checks each run against local."""

    def __init__(self, cluster: Any, scale: Scale, budget: float, say: Progress) -> None:
        from harness.nodes.program import run_program

        self.cluster, self.scale, self.budget, self.say = cluster, scale, budget, say
        self._run = run_program
        self.setup = ""  # the ExCache's policy and prefetch, as the remote runs reported

    def sh(self, argv: list[str]) -> Any:
        """A helper command on the pnode, on local memory."""
        return self._run(self.cluster, argv, memory="local", timeout=self.scale.timeout)

    def once(self, w: Workload, tag: str, cache: int | None,
             timeout: float | None = None) -> tuple[Outcome, Any] | None:
        """One run; None when it did not finish within `timeout` seconds."""
        kw: dict[str, Any] = {"memory": "local"} if cache is None else {"memory": "remote",
                                                                        "cache": cache}
        timeout = timeout or self.scale.timeout
        t0 = time.monotonic()
        try:
            res = self._run(self.cluster, w.argv(tag), client=w.client, env=w.env,
                            timeout=timeout, **kw)
        except (HarnessError, subprocess.TimeoutExpired) as exc:
            if cache is not None and time.monotonic() - t0 >= timeout:
                return None  # run_program stopped it (and says so in its own words)
            where = "local memory" if cache is None else f"a {_mib(cache)} cache"
            raise HarnessError(f"apps: {w.name} on {where}: {exc}") from exc
        return w.outcome(res, self.sh, tag), res

    def local(self, w: Workload, tag: str) -> tuple[Outcome, Any]:
        got = self.once(w, tag, None)
        if got is None:  # only remote runs are let time out
            raise HarnessError(f"apps: {w.name} did not finish on local memory")
        out, res = got
        if res.returncode or (w.client and res.client_returncode) or out.seconds is None:
            raise HarnessError(f"apps: {w.name} failed on local memory ({out.fingerprint}; "
                               f"stderr: {tail(res.stderr)})")
        return out, res

    def measure(self, w: Workload, rounds: int) -> Measured:
        say = self.say
        say(f"{w.name}: preparing")
        w.prepare(self.sh)
        say(f"{w.name}: on local memory, for its peak")
        ref, res = self.local(w, "probe")
        peak = int(res.stats.get("peak_anon_bytes") or 0)
        if peak <= 0:
            raise HarnessError(f"apps: {w.name}: run_program reported no peak_anon_bytes "
                               f"({res.stats})")
        caches = {f: cache_for(peak, f) for f in FRACTIONS}
        # A remote run may take `budget` times the local one (wall time), at least a minute.
        wall = max(MIN_BUDGET, self.budget * res.seconds)
        bound = wall * ref.seconds / res.seconds  # the same, in the outcome's time
        say(f"{w.name}: peak {_mib(peak)}, {ref.seconds:.2f} s; caches "
            + ", ".join(f"{f:g} %: {_mib(c)}" for f, c in caches.items())
            + f"; a remote run may take {wall:.0f} s")
        m = Measured(w.name, peak, remote={f: [] for f in FRACTIONS},
                     rps_remote={f: [] for f in FRACTIONS}, capped={f: 0 for f in FRACTIONS})
        for r in range(rounds):
            out, _ = self.local(w, f"r{r}-local")
            if out.fingerprint != ref.fingerprint:
                raise HarnessError(f"apps: {w.name} on local memory gave different results "
                                   f"from run to run: {ref.fingerprint!r} vs {out.fingerprint!r}")
            m.local.append(out.seconds)
            if out.rps is not None:
                m.rps_local.append(out.rps)
            say(f"{w.name}: round {r + 1}/{rounds}, local: {out.seconds:.2f} s"
                + (f", {out.rps:,.0f} req/s" if out.rps else ""))
            for frac in order(r):
                self._remote(w, m, r, rounds, frac, caches[frac], ref, out, wall, bound)
        return m

    def _remote(self, w: Workload, m: Measured, r: int, rounds: int, frac: float, cache: int,
                ref: Outcome, local: Outcome, wall: float, bound: float) -> None:
        head = f"{w.name}: round {r + 1}/{rounds}, cache {frac:g} % ({_mib(cache)})"
        skip = any(m.capped[f] for f in FRACTIONS if f >= frac)  # this or a bigger cache
        got = None if skip else self.once(w, f"r{r}-{suffix(frac)}", cache, wall)
        if got is None:  # counted as the budget: a lower bound
            m.remote[frac].append(bound)
            m.capped[frac] += 1
            if local.rps is not None:
                m.rps_remote[frac].append(local.rps * local.seconds / bound)
            self.say(f"{head}: " + ("skipped, as a run with this cache or a bigger one did "
                                    "not finish" if skip else f"stopped at {wall:.0f} s")
                     + f"; counted as >= {bound / local.seconds:.1f}x")
            return
        out, res = got
        if out.fingerprint != ref.fingerprint or out.seconds is None:
            raise HarnessError(
                f"apps: {w.name} with a {_mib(cache)} cache ({frac:g} % of its {_mib(m.peak)} "
                f"peak) differs from local memory: local {ref.fingerprint!r}, remote "
                f"{out.fingerprint!r}; stderr: {tail(res.stderr)}")
        m.remote[frac].append(out.seconds)
        if out.rps is not None:
            m.rps_remote[frac].append(out.rps)
        st = res.stats or {}
        ex = st.get("excache") or {}
        self.setup = f"ExCache {st.get('policy', 'fifo')}, prefetch {st.get('prefetch', '?')}"
        self.say(f"{head}: {out.seconds:.2f} s, {out.seconds / local.seconds:.2f}x"
                 + (f", {out.rps:,.0f} req/s" if out.rps else "")
                 + (f", {ex['misses']:,} misses" if "misses" in ex else ""))


def run(placement: str = "process", rounds: int = 3, plot_path: Path | None = None,
        progress: Progress | None = None, apps: list[str] | None = None,
        budget: float = 20.0) -> Report:
    """`budget`: a remote run is stopped after that many times its app's local
    wall time (at least a minute) and counted as that long: a lower bound."""
    from harness.nodes.cluster import open_cluster

    if rounds < 1 or budget <= 1:
        raise HarnessError(f"apps: rounds must be at least 1 and the budget more than 1x, "
                           f"got {rounds} and {budget:g}")
    say = progress or silent
    scale = GUEST if placement == "vm" else HOST
    # Inputs and outputs: a host directory, or one in the pnode guest's own /tmp (tmpfs).
    workdir = (f"/tmp/dh-apps-{secrets.token_hex(6)}" if placement == "vm"
               else tempfile.mkdtemp(prefix="dh-apps-"))
    measured: dict[str, Measured] = {}
    try:
        work = workloads(scale, workdir, free_port(), placement == "vm", apps)
        say(f"starting lego3 ({placement})")
        with open_cluster("lego3", placement=placement, timeout=300 if placement == "vm" else 30,
                          progress=say) as c:
            runner = _Runner(c, scale, budget, say)
            runner.sh(["mkdir", "-p", workdir])  # a guest's /tmp goes with the guest
            for w in work:
                measured[w.name] = runner.measure(w, rounds)
    finally:
        if placement != "vm":
            shutil.rmtree(workdir, ignore_errors=True)
    accel = None
    if placement == "vm":
        from harness.vm import accel as accel_mod

        accel = accel_mod.probe().accel
    rep = Report("apps", placement=placement, accel=accel, rows=rows_of(measured))
    rep.notes += capped_notes(measured, budget)
    rep.notes.append(f"scale: {scale.label}; {rounds} rounds; {runner.setup}; caches of "
                     "12.5/25/50 % of each app's peak RssAnon on local memory, rounded down "
                     "to 64 pages")
    for w in work:
        m = measured[w.name]
        rep.notes.append(f"  {w.describe()}; peak {_mib(m.peak)}")
    if plot_path is not None:
        rep.notes.append(f"plot: {plot(measured, Path(plot_path), placement, scale.label)}")
    return rep


def curves(measured: dict[str, Measured]) -> dict[str, dict[float, float]]:
    return {name: {f: percentile(m.slowdowns(f), 50) for f in FRACTIONS if m.remote.get(f)}
            for name, m in measured.items()}


def plot(measured: dict[str, Measured], path: Path, placement: str = "process",
         label: str = "host") -> Path:
    """Median slowdown against cache size per app, beside LegoOS's TensorFlow;
    a triangle marks a lower bound (a run stopped at the budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cs = curves(measured)
    for name, curve in cs.items():
        xs = sorted(curve)
        (line,) = ax.plot(xs, [curve[x] for x in xs], marker="o", label=name)
        capped = [x for x in xs if measured[name].capped.get(x)]
        ax.plot(capped, [curve[x] for x in capped], "^", color=line.get_color(), ms=10)
    ax.plot(list(LEGOOS), list(LEGOOS.values()), "k--s", label="LegoOS TensorFlow (paper)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("ExCache size (% of the program's peak anonymous memory)")
    ax.set_ylabel("slowdown vs local memory (median)")
    if max([v for c in cs.values() for v in c.values()] + [1.0]) > 4:
        ax.set_yscale("log")  # a slow app would flatten the others
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(f"Unmodified programs on disaggregated memory ({placement}, {label})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
