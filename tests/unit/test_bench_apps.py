"""`harness bench apps`: its pure parts (redis-benchmark's output, cache sizes,
the rows' arithmetic, how runs are interleaved and checked) with a stand-in
for run_program, and its scripts run for real on small inputs. No cluster."""

import hashlib
import subprocess
import sys

import pytest

from harness.bench import apps
from harness.bench import apps_workloads as aw
from harness.errors import HarnessError
from harness.nodes.program import ProgramResult

MiB = 1 << 20

BENCH_OUT = (b"SET: rps=0.0 (overall: -nan) avg_msec=-nan (overall: -nan)\r"
             b"SET: rps=123564.0 (overall: 123071.7) avg_msec=0.267 (overall: 0.267)\r"
             b"                                                  \r"
             b"SET: 134861.77 requests per second, p50=0.215 msec\n"
             b"GET: rps=140052.0 (overall: 138131.6) avg_msec=0.232 (overall: 0.234)\r"
             b"                                                  \r"
             b"GET: 189573.47 requests per second, p50=0.143 msec\n"
             b"check 6a3bfaac99804e0ba41889dca92b1092c04b1c4d\n")


def test_parse_rps_reads_the_summaries_and_skips_progress_lines():
    assert aw.parse_rps(BENCH_OUT) == {"SET": 134861.77, "GET": 189573.47}
    assert aw.parse_rps(b"") == {}
    assert aw.parse_rps(b"LPUSH (needed to benchmark LRANGE): 5000.00 requests per second\n") \
        == {"LPUSH (needed to benchmark LRANGE)": 5000.0}


def Res(**kw) -> ProgramResult:
    return ProgramResult(**{"returncode": 0, "seconds": 1.0, "stats": {}, **kw})


def test_redis_outcome_times_the_requests_and_fingerprints_the_data():
    w = aw.Redis(aw.HOST, "/tmp/x", 6400)
    out = w.outcome(Res(client_returncode=0, client_stdout=BENCH_OUT), None, "t")
    n = aw.HOST.redis_requests
    assert out.seconds == pytest.approx(n / 134861.77 + n / 189573.47)
    assert out.rps == pytest.approx(2 * n / out.seconds)
    assert "GET,SET" in out.fingerprint and "6a3bfaac" in out.fingerprint
    bad = w.outcome(Res(client_returncode=5, client_stdout=b"error"), None, "t")
    assert bad.seconds is None and bad.fingerprint != out.fingerprint
    assert "127.0.0.1" in w.argv("t") and "6400" in w.argv("t")


def test_cache_sizes_are_whole_runs_of_64_pages():
    assert apps.cache_for(100 * MiB, 12.5) == 12 * MiB + 512 * 1024
    assert apps.cache_for(100 * MiB, 25) == 25 * MiB
    assert apps.cache_for(94 * MiB + 3000, 12.5) == 11 * MiB + 3 * 256 * 1024
    assert apps.cache_for(1 * MiB, 12.5) == 256 * 1024  # never below 64 pages
    assert apps.cache_for(0, 50) == 256 * 1024
    for peak in (3 * MiB + 1, 77 * MiB + 4095, 665 * MiB):
        for f in apps.FRACTIONS:
            c = apps.cache_for(peak, f)
            assert c % (64 * 4096) == 0 and c <= max(peak * f / 100, 256 * 1024)


def test_rounds_rotate_the_cache_sizes():
    assert [apps.order(r) for r in range(4)] == [
        [12.5, 25, 50], [25, 50, 12.5], [50, 12.5, 25], [12.5, 25, 50]]
    assert [apps.suffix(f) for f in apps.FRACTIONS] == ["12", "25", "50"]


def measured(name, local, remote, rps_local=(), rps_remote=None):
    m = apps.Measured(name, 64 * MiB, list(local), {f: list(v) for f, v in remote.items()},
                      list(rps_local), {f: list(v) for f, v in (rps_remote or {}).items()})
    return m


def test_slowdown_rows_pair_each_remote_run_with_its_rounds_local_run():
    m = measured("xz", [2.0, 4.0, 3.0], {12.5: [8.0, 8.0, 9.0], 25: [4.0, 4.0, 9.0],
                                          50: [2.0, 4.0, 3.3]})
    rows = {r.metric: r for r in apps.slowdown_rows(m)}
    assert list(rows) == ["app_xz_slowdown_12", "app_xz_slowdown_25", "app_xz_slowdown_50"]
    r = rows["app_xz_slowdown_25"]  # per round: 2, 1, 3
    assert (r.unit, r.p50, r.p99, r.n) == ("x", 2.0, 3.0, 3)
    assert r.floor == "same program on local memory" and r.floor_p50 == 3.0
    assert r.ratio == r.p50
    assert rows["app_xz_slowdown_12"].p50 == 3.0  # 4, 2, 3


def test_rps_rows_and_the_threads_row():
    m = measured("redis", [1, 1, 1], {25: [2, 2, 2]}, [100.0, 120.0, 110.0],
                 {25: [50.0, 40.0, 60.0]})
    rows = {r.metric: r for r in apps.rps_rows(m)}
    assert rows["app_redis_rps_local"].p50 == 110.0 and rows["app_redis_rps_local"].floor is None
    r25 = rows["app_redis_rps_25"]
    assert r25.p50 == 50.0 and r25.floor_p50 == 110.0 and r25.ratio == pytest.approx(50 / 110)
    one = measured("numpy1t", [1.0, 2.0, 1.0], {25: [1.5, 2.4, 1.2]})  # 1.5, 1.2, 1.2
    two = measured("numpy2t", [1.0, 1.0, 1.0], {25: [1.8, 2.0, 1.2]})  # median 1.8
    row = apps.threads_row(one, two)
    assert row.metric == "app_numpy2t_vs_1t_25" and row.p50 == pytest.approx(1.8 / 1.2)
    assert row.floor_p50 == pytest.approx(1.2) and row.ratio == row.p50
    all_rows = [r.metric for r in apps.rows_of({"numpy1t": one, "numpy2t": two, "redis": m})]
    assert all_rows[-1] == "app_numpy2t_vs_1t_25"
    assert "app_redis_rps_25" in all_rows


class Clock:
    def __init__(self):
        self.t = 0.0

    def monotonic(self):
        return self.t


class Fake:
    """Stands in for run_program: a program whose time and output depend on
    the cache it gets; `wrong` gives a cache size a different answer and
    `hang` makes a cache size run into its timeout."""

    def __init__(self, clock, wrong=None, hang=None):
        self.clock, self.wrong, self.hang, self.calls = clock, wrong, hang, []

    def __call__(self, cluster, argv, memory="local", cache=None, client=None, env=None,
                 timeout=600.0):
        self.calls.append((memory, cache))
        secs = 10.0 if memory == "local" else 10.0 * (1 + 64 * MiB / cache)
        if memory == "remote" and self.hang is not None and cache <= self.hang:
            self.clock.t += timeout
            raise subprocess.TimeoutExpired(argv, timeout)
        self.clock.t += secs
        out = b"41\n" if memory == "remote" and cache == self.wrong else b"42\n"
        return Res(seconds=secs, stdout=out, stats={"peak_anon_bytes": 100 * MiB,
                                                    "excache": {"misses": 7}})


class Prog(aw.Workload):
    name = "prog"

    def argv(self, tag):
        return ["prog", tag]

    def describe(self):
        return "prog"


def runner(monkeypatch, fake, budget=20.0):
    monkeypatch.setattr(apps, "time", fake.clock)
    r = apps._Runner("cluster", aw.HOST, budget, lambda _m: None)
    r._run = fake
    return r


def test_runs_interleave_local_and_remote_and_are_checked(monkeypatch):
    fake = Fake(Clock())
    m = runner(monkeypatch, fake).measure(Prog(aw.HOST, "/tmp/x"), 2)
    c = {f: apps.cache_for(100 * MiB, f) for f in apps.FRACTIONS}
    assert fake.calls == [("local", None),  # the probe, for the peak
                          ("local", None), ("remote", c[12.5]), ("remote", c[25]),
                          ("remote", c[50]),
                          ("local", None), ("remote", c[25]), ("remote", c[50]),
                          ("remote", c[12.5])]
    assert m.local == [10.0, 10.0] and m.peak == 100 * MiB
    assert m.slowdowns(25) == [pytest.approx(1 + 64 * MiB / c[25])] * 2
    with pytest.raises(HarnessError, match=r"prog with a 25\.00 MiB cache \(25 %"):
        runner(monkeypatch, Fake(Clock(), wrong=c[25])).measure(Prog(aw.HOST, "/tmp/x"), 1)


def test_a_run_past_the_budget_counts_as_a_lower_bound(monkeypatch):
    c = {f: apps.cache_for(100 * MiB, f) for f in apps.FRACTIONS}
    fake = Fake(Clock(), hang=c[25])
    m = runner(monkeypatch, fake, budget=20.0).measure(Prog(aw.HOST, "/tmp/x"), 2)
    # round 1 runs 12.5 (times out) and 25 (times out); round 2 skips both.
    assert fake.calls.count(("remote", c[12.5])) == 1
    assert fake.calls.count(("remote", c[25])) == 1
    assert m.capped == {12.5: 2, 25: 2, 50: 0}
    assert m.slowdowns(12.5) == [20.0, 20.0]  # 200 s of a 10 s program
    notes = apps.capped_notes({"prog": m}, 20.0)
    assert len(notes) == 2 and "lower bound" in notes[0]
    with pytest.raises(HarnessError, match="budget"):
        apps.run(budget=1.0)


def py(code, *args):
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_generated_xz_input_is_deterministic_text(tmp_path):
    path = tmp_path / "d" / "words.txt"
    sha = py(aw.GEN, path, 300_000).decode().strip()
    data = path.read_bytes()
    assert len(data) == 300_000 and hashlib.sha256(data).hexdigest() == sha
    assert py(aw.GEN, tmp_path / "again.txt", 300_000).decode().strip() == sha
    assert data.count(b"\n") > 1000 and data.isascii()


def test_the_python_and_numpy_scripts_print_the_same_checksums_each_run():
    assert py(aw.PYHEAP, 20_000) == py(aw.PYHEAP, 20_000)
    one = py(aw.MATMUL, 96)
    assert one == py(aw.MATMUL, 96) and one.split()[0] == b"96"
    import numpy as np

    a = np.arange(96 * 96, dtype=np.float64).reshape(96, 96) % 7
    d = (a @ (a.T % 5)) @ a
    assert float(one.split()[3]) == d[-1, -1]


def test_unknown_apps_are_refused():
    with pytest.raises(HarnessError, match="unknown app"):
        aw.workloads(aw.HOST, "/tmp/x", 6400, names=["tensorflow"])
    names = [w.name for w in aw.workloads(aw.GUEST, "/tmp/x", 6400, True)]
    assert names == ["redis", "xz", "python", "numpy1t", "numpy2t"]
