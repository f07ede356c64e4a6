"""`harness …`: the command line. Every subcommand has --help; those that
report take --json."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.errors import ClusterError, HarnessError


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, ["-" * w for w in widths], *rows]]
    return "\n".join(lines)


def _mib(n: int | None) -> str:
    return f"{n >> 20} MiB" if n else "-"


# ---- doctor ---------------------------------------------------------------

def cmd_doctor(args: argparse.Namespace) -> int:
    from harness.doctor import run_checks

    checks = run_checks()
    if args.json:
        print(json.dumps({"checks": [c.__dict__ for c in checks]}))
    else:
        rows = [[c.name, "ok" if c.ok else ("MISSING" if c.required else "no"), c.detail,
                 "" if c.ok else c.fix] for c in checks]
        print(_table(["check", "state", "detail", "fix"], rows))
    return 0 if all(c.ok or not c.required for c in checks) else 1


# ---- up / status / down ---------------------------------------------------

def _status_rows(nodes: list[dict]) -> list[list[str]]:
    return [[n["name"], n["role"], n["state"], n["placement"], n.get("accel") or "-",
             _mib(n.get("memory")), ", ".join(n.get("links", [])) or "-",
             f"{n['boot_s']:.2f} s" if n.get("boot_s") is not None else "-"]
            for n in nodes]


_STATUS_HEAD = ["node", "role", "state", "placement", "accel", "memory", "links", "boot"]


def cmd_up(args: argparse.Namespace) -> int:
    from harness.nodes import control
    from harness.nodes.cluster import Cluster
    from harness.topology import load

    topo = load(args.topology)
    if args.placement:
        topo = topo.with_placement(args.placement)
    try:
        state = control.request(topo.name, "status", timeout=2.0)
    except ClusterError:
        state = None
    if state is not None:
        raise ClusterError(f"a cluster named {topo.name!r} is already running "
                           f"(pid {state['pid']}); `harness down` first")
    run_dir = control.cluster_dir(topo.name)
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale one whose `up` died
    cluster = Cluster(topo, run_dir=run_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        cluster.start(timeout=args.timeout, progress=lambda m: _err(f"  {m}"))
        print(_table(_STATUS_HEAD, _status_rows(cluster.status())), flush=True)
        _err(f"cluster {topo.name} is up (logs in {run_dir}); `harness status` and "
             "`harness down` work from another shell; Ctrl-C here stops it")
        try:
            control.serve(cluster, stop)
        except KeyboardInterrupt:
            pass
    finally:
        _err(f"stopping {topo.name} ...")
        cluster.stop()
    _err(f"cluster {topo.name} is down")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from harness.nodes import control

    try:
        state = control.request(args.name, "status", timeout=args.timeout)
        code = 0
    except ClusterError as exc:
        state, code = control.last_state(args.name), 1
        if not args.json:
            _err(str(exc))
    if args.json:
        print(json.dumps(state or {"cluster": None, "nodes": []}))
    elif state:
        print(_table(_STATUS_HEAD, _status_rows(state["nodes"])))
    return code


def cmd_down(args: argparse.Namespace) -> int:
    from harness.nodes import control

    control.request(args.name, "down", timeout=args.timeout)
    if not control.wait_gone(args.name, args.timeout):
        raise ClusterError(f"cluster {args.name!r} said it was stopping but its control "
                           f"socket is still there after {args.timeout:g} s")
    _err(f"cluster {args.name} is down")
    return 0


# ---- sql ------------------------------------------------------------------

def cmd_sql(args: argparse.Namespace) -> int:
    if args.db:
        from harness.dbos import DBOS

        db = DBOS.open(args.db)
        try:
            res = db.sql(args.query, args.params, write=args.write).to_dict()
        finally:
            db.close()
    else:
        from harness.nodes import control

        res = control.request(args.name, "sql", timeout=60.0, query=args.query,
                              params=args.params, write=args.write)
    if args.json:
        print(json.dumps(res))
    elif res["columns"]:
        print(_table(res["columns"], [["NULL" if v is None else str(v) for v in r]
                                      for r in res["rows"]]))
    else:
        _err(f"{res['changes']} row(s) changed")
    return 0


# ---- inspect --------------------------------------------------------------

def cmd_inspect(args: argparse.Namespace) -> int:
    from harness.isolation.inspect import DEFAULT_GATES, as_dicts, inspect_files

    findings, errors = inspect_files(args.files, DEFAULT_GATES + tuple(args.gate))
    if args.json:
        print(json.dumps({"findings": as_dicts(findings), "errors": errors}))
    else:
        for f in findings:
            print(f.line())
        for e in errors:
            _err(e)
        _err(f"{len(args.files)} file(s): {len(findings)} finding(s)"
             + (f", {len(errors)} unreadable" if errors else ""))
    return 2 if errors else 1 if findings else 0


# ---- explore --------------------------------------------------------------

def cmd_explore(args: argparse.Namespace) -> int:
    from harness.isolation import explore as ex

    if not 0 < args.budget <= 1:
        raise HarnessError(f"--budget is a fraction of the fastest throughput, in (0, 1]; "
                           f"got {args.budget}")
    if args.placement == "vm":
        import io

        from harness.vm.boot import boot

        out, err = io.BytesIO(), io.BytesIO()
        code = boot([sys.executable, "-m", "harness.isolation.explore",
                     str(Path(args.config).resolve()), "--budget", str(args.budget)],
                    stdout=out, stderr=err, timeout=900,
                    progress=None if args.json else (lambda m: _err(f"  {m}")))
        if code:
            raise HarnessError(f"explore failed in the guest (status {code}):\n"
                               f"{err.getvalue().decode(errors='replace')[-2000:]}")
        raw = json.loads(out.getvalue())
        outcomes = [ex.Outcome(c["assignment"], c["requests_per_s"], c["safest_in_budget"],
                               c["dominated_by"]) for c in raw["configurations"]]
        notes = [*raw["notes"], "measured in a TCG guest (protection keys for mpk)"]
    else:
        cfg = ex.load(args.config)
        outcomes, notes = ex.explore(cfg["requests"], cfg["value"], cfg["backends"],
                                     args.budget)
    if args.plot:
        notes.append(f"plot: {ex.plot(outcomes, Path(args.plot))}")
    if args.json:
        print(json.dumps(ex.to_json(outcomes, notes)))
        return 0
    rows = [[o.name, f"{o.requests_per_s:,.0f}", str(len(o.dominated_by)),
             "*" if o.safest_in_budget else ""] for o in outcomes]
    print(_table(["configuration", "requests/s", "safer configs", "safest in budget"], rows))
    for n in notes:
        print(n)
    return 0


# ---- images and boot ------------------------------------------------------

def cmd_images(args: argparse.Namespace) -> int:
    from harness import images

    if args.action == "build":
        img = images.build(progress=None if args.json else (lambda m: _err(f"  {m}")),
                           force=args.force)
        if args.json:
            print(json.dumps({"kernel": img.kernel, "vmlinux": img.vmlinux,
                              "initramfs": img.initramfs, "kernel_version": img.kernel_version,
                              "kernel_package": img.kernel_package, "key": img.key}))
        else:
            print(f"kernel     {img.kernel} ({img.kernel_package})\n"
                  f"vmlinux    {img.vmlinux or '- (no PVH note: the bzImage boots)'}\n"
                  f"initramfs  {img.initramfs} ({len(img.modules)} modules)")
    elif args.action == "list":
        found = images.list_images()
        if args.json:
            print(json.dumps({"images": [i.__dict__ for i in found]}))
        elif found:
            print(_table(["key", "kernel", "boots", "built"],
                         [[i.key, i.kernel_version, "vmlinux (PVH)" if i.vmlinux else "bzImage",
                           time.strftime("%Y-%m-%d %H:%M", time.localtime(i.built))]
                          for i in found]))
        else:
            _err("no images yet; `harness images build` makes one")
    else:
        freed = images.clean()
        if args.json:
            print(json.dumps({"freed_bytes": freed}))
        else:
            _err(f"removed the cached images and packages ({freed >> 20} MiB)")
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    from harness.topology import parse_size
    from harness.vm.boot import boot

    argv = args.cmd
    if not argv:
        raise HarnessError("give the command to run after --, e.g. "
                           "`harness boot -- uname -a`")
    quiet = args.quiet or not sys.stderr.isatty()
    return boot(argv, role=args.role, timeout=args.timeout, deterministic=args.deterministic,
                memory=parse_size(args.memory),
                progress=None if quiet else (lambda m: _err(f"[boot] {m}")))


# ---- bench ----------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    progress = None if args.json else (lambda m: _err(f"  {m}"))
    if args.rounds is None:
        args.rounds = 3 if args.which == "apps" else 5
    if args.which == "transport":
        from harness.bench import transport

        rep = transport.run(link=args.link, n=args.n, progress=progress)
    elif args.which == "gates":
        from harness.bench import gates

        rep = gates.run(placement=args.placement, n=min(args.n, 20000),
                        deterministic=args.deterministic, progress=progress)
    elif args.which == "paging":
        from harness.bench import paging

        plot = "paging-sweep.png" if args.plot is None else args.plot
        rep = paging.run(placement=args.placement, n=min(args.n, 5000), rounds=args.rounds,
                         plot_path=Path(plot) if plot else None, progress=progress)
    elif args.which == "apps":
        from harness.bench import apps

        plot = "apps-slowdown.png" if args.plot is None else args.plot
        rep = apps.run(placement=args.placement, rounds=args.rounds,
                       plot_path=Path(plot) if plot else None, progress=progress,
                       apps=args.apps.split(",") if args.apps else None, budget=args.budget)
    elif args.which == "dbos":
        from harness.bench import dbos

        rep = dbos.run(placement=args.placement, n=min(args.n, 2000), progress=progress)
    elif args.which == "reliability":
        from harness.bench import reliability

        if args.duration <= 0:
            raise HarnessError(f"--duration must be positive, got {args.duration}")
        rep = reliability.run(duration=args.duration, progress=progress)
        print(rep.to_json() if args.json else rep.table())
        return 1 if any(r.metric == "data_lost" and r.p50 for r in rep.rows) else 0
    else:
        from harness.bench import boot

        if args.vng and not shutil.which(args.vng):
            raise HarnessError(f"--vng {args.vng}: not found; install virtme-ng "
                               "(`pip install virtme-ng`) or give the path to vng")
        rep = boot.run(n=args.rounds, parallel=not args.no_parallel,
                       vng=shutil.which(args.vng) if args.vng else None,
                       deterministic=args.deterministic, progress=progress)
    print(rep.to_json() if args.json else rep.table())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from harness.nodes.cluster import open_cluster
    from harness.topology import parse_size

    argv = args.cmd
    if not argv:
        raise HarnessError("give the command to run on the pnode after --")
    quiet = not sys.stderr.isatty()
    if args.memory == "local" and not args.client and not args.stats_json:
        with open_cluster(args.topology, placement=args.placement, timeout=args.timeout,
                          progress=None if quiet else (lambda m: _err(f"[run] {m}"))) as c:
            pnode = next(n.name for n in c.topology.nodes if n.role == "pnode")
            r = c.exec(pnode, argv, timeout=args.timeout)
        sys.stdout.buffer.write(r.stdout)
        sys.stderr.buffer.write(r.stderr)
        return r.returncode
    from harness.nodes.program import run_program, summary

    with open_cluster(args.topology, placement=args.placement, timeout=args.timeout,
                      memory_channels=args.channels,
                      progress=None if quiet else (lambda m: _err(f"[run] {m}"))) as c:
        res = run_program(c, argv, memory=args.memory, cache=parse_size(args.cache),
                          policy=args.policy, prefetch=args.prefetch,
                          client=shlex.split(args.client) if args.client else None,
                          timeout=args.timeout, capture=False)
    sys.stdout.buffer.write(res.stdout)
    sys.stderr.buffer.write(res.stderr)
    if res.client_returncode is not None:
        sys.stdout.buffer.write(res.client_stdout)
        sys.stderr.buffer.write(res.client_stderr)
    _err(f"[run] {summary(res)}")
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(res.stats, indent=1) + "\n")
    code = res.returncode if res.returncode >= 0 else 128 - res.returncode
    return code or (res.client_returncode or 0)


def cmd_fault(args: argparse.Namespace) -> int:
    from harness.nodes import control

    control.request(args.name, "fault", timeout=args.timeout, node=args.node,
                    action=args.action)
    _err(f"{args.action} {args.node}: done")
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from harness import smoke

    return smoke.run(timeout=args.timeout)


def cmd_demo(args: argparse.Namespace) -> int:
    from harness import demo

    return demo.run(placement=args.placement)


# ---- parser ---------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness",
        description="Boot LegoOS-style disaggregated clusters (processor, memory and storage "
                    "nodes) as processes or QEMU VMs, and measure them.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str,
            json_flag: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print one JSON object")
        return sp

    add("doctor", cmd_doctor, "what this host has and lacks, each with its fix", True)

    sp = add("up", cmd_up, "boot a cluster and keep it up until Ctrl-C or `harness down`")
    sp.add_argument("topology", nargs="?", default="lego3",
                    help="a built-in topology name or a .toml file (default: lego3)")
    sp.add_argument("--placement", choices=["process", "vm"],
                    help="run every node this way (default: as the topology says)")
    sp.add_argument("--timeout", type=float, default=60.0,
                    help="seconds to wait for every node to be ready (default: 60)")

    for name, fn, help_ in (("status", cmd_status, "list the nodes of a running cluster"),
                            ("down", cmd_down, "stop a cluster started with `harness up`")):
        sp = add(name, fn, help_, json_flag=name == "status")
        sp.add_argument("--name", default="lego3",
                        help="the cluster (topology) name (default: lego3)")
        sp.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for an answer (default: 10)")

    sp = add("sql", cmd_sql, "query the DBOS tables: of the running cluster's snode, or of a "
             "local file with --db (a new file gets the schema)", True)
    sp.add_argument("query", help="one SQL statement")
    sp.add_argument("params", nargs="*", help="values for the statement's ? placeholders")
    sp.add_argument("--db", metavar="FILE", help="a local DBOS database file instead of a cluster")
    sp.add_argument("--write", action="store_true",
                    help="allow the statement to change data (refused without it)")
    sp.add_argument("--name", default="lego3", help="the cluster (default: lego3)")

    sp = add("inspect", cmd_inspect, "find WRPKRU/XRSTOR outside registered gates in ELF "
             "files (ERIM's rules); exit 0 clean, 1 findings, 2 unreadable", True)
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.add_argument("--gate", action="append", default=[], metavar="PREFIX",
                    help="functions whose names start with PREFIX are gates (repeatable)")

    sp = add("explore", cmd_explore, "run every assignment of components to isolation "
             "backends; mark the safest within a throughput budget", True)
    sp.add_argument("config", help="the workload and backends to explore (TOML)")
    sp.add_argument("--budget", type=float, default=0.5,
                    help="keep configurations with at least this fraction of the fastest "
                         "one's throughput (default: 0.5)")
    sp.add_argument("--placement", choices=["process", "vm"], default="process",
                    help="vm: explore in a guest, where mpk is real (default: process)")
    sp.add_argument("--plot", metavar="PNG", default="explore.png",
                    help="where to draw the design space (default: explore.png; '' for none)")

    sp = add("images", cmd_images, "guest kernel + initramfs: built once and cached", True)
    sp.add_argument("action", choices=["build", "list", "clean"])
    sp.add_argument("--force", action="store_true", help="build: rebuild even if up to date")

    sp = add("boot", cmd_boot, "boot one guest, run CMD in it, pass its output through, "
             "exit with its status")
    sp.add_argument("--role", choices=["pnode", "mnode", "snode"], default="pnode",
                    help="the guest's role; an snode gets its persistent ext4 disk "
                         "(default: pnode)")
    sp.add_argument("--timeout", type=float, default=300.0,
                    help="seconds to wait for the command to finish (default: 300)")
    sp.add_argument("--memory", default="512MiB", help="guest memory (default: 512MiB)")
    sp.add_argument("--deterministic", action="store_true",
                    help="count instructions (-icount): in-guest timings repeat exactly")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    sp = add("bench", cmd_bench, "run a benchmark; every row is reported beside its floor", True)
    sp.add_argument("which", choices=["transport", "boot", "dbos", "paging", "gates",
                                      "reliability", "apps"],
                    help="the benchmark")
    sp.add_argument("--plot", metavar="PNG",
                    help="paging, apps: where to draw the cache-size sweep (default: "
                         "paging-sweep.png, apps-slowdown.png; '' for none)")
    sp.add_argument("--placement", choices=["process", "vm"], default="process",
                    help="dbos, gates: on the host or in a guest; paging, apps: the mnode and "
                         "the workload as processes, or both in VMs (default: process)")
    sp.add_argument("--link", choices=["shm", "unix", "tcp"], default="shm",
                    help="transport benchmark: the kind of link (default: shm)")
    sp.add_argument("-n", type=int, default=20000,
                    help="samples per row: transport round trips (default: 20000); dbos "
                         "operations (capped at 2000)")
    sp.add_argument("--rounds", type=int,
                    help="boot: samples per row; paging: runs per sweep point (default: 5); "
                         "apps: runs per app and cache size (default: 3)")
    sp.add_argument("--apps", metavar="NAMES",
                    help="apps: a comma-separated subset of redis,xz,python,numpy1t,numpy2t "
                         "(default: all)")
    sp.add_argument("--budget", type=float, default=20.0,
                    help="apps: stop a remote run after this many times its local time and "
                         "report that as a lower bound (default: 20)")
    sp.add_argument("--duration", type=float, default=180.0,
                    help="reliability: seconds the soak runs (default: 180)")
    sp.add_argument("--no-parallel", action="store_true",
                    help="boot: skip the three-guests-at-once rows")
    sp.add_argument("--vng", metavar="PATH",
                    help="boot: also time virtme-ng's `vng --exec true` (give vng's path)")
    sp.add_argument("--deterministic", action="store_true",
                    help="boot, gates: guests count instructions (-icount)")
    sp = add("run", cmd_run, "boot a cluster, run CMD on its pnode, tear down; exits with "
             "CMD's status")
    sp.add_argument("topology", nargs="?", default="lego3")
    sp.add_argument("--placement", choices=["process", "vm"])
    sp.add_argument("--timeout", type=float, default=300.0)
    sp.add_argument("--memory", choices=["local", "remote"], default="local",
                    help="remote: the program's anonymous memory lives on the mnode, behind "
                    "an ExCache (default: local)")
    sp.add_argument("--cache", default="16MiB",
                    help="ExCache size per process with --memory remote (default: 16MiB)")
    sp.add_argument("--policy", choices=["fifo", "lru", "random"], default="fifo")
    sp.add_argument("--prefetch", type=int, default=8,
                    help="lines one miss brings in, 1 to 16 (default: 8)")
    sp.add_argument("--stats-json", metavar="PATH",
                    help="write the run's memory counters as one JSON object")
    sp.add_argument("--client", metavar="CMD",
                    help="a load generator to run on local memory once CMD listens on a TCP "
                    "port; CMD gets SIGTERM when it exits (e.g. 'redis-benchmark -q')")
    sp.add_argument("--channels", type=int, default=4,
                    help="memory channels in the pnode guest (placement vm): processes that "
                    "can be on remote memory at once (default: 4)")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    sp = add("fault", cmd_fault, "inject a fault into a node of a running cluster")
    sp.add_argument("action", choices=["kill", "pause", "resume", "restart"])
    sp.add_argument("node")
    sp.add_argument("--name", default="lego3", help="the cluster (default: lego3)")
    sp.add_argument("--timeout", type=float, default=180.0,
                    help="seconds to wait (a restart waits for the node; default: 180)")

    sp = add("smoke", cmd_smoke, "the CI smoke boot: VM cluster, a remote page, an MPK fault, "
             "a SQL query; each phase timed")
    sp.add_argument("--timeout", type=float, default=180.0)

    sp = add("demo", cmd_demo, "the main job: boot the VM cluster, run the workloads, write a "
             "report")
    sp.add_argument("--placement", choices=["vm"], default="vm",
                    help="where the nodes run (vm: the ExCache and MPK parts need guests)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" is the command for boot/run, never an option or a topology.
    cmd = argv[argv.index("--") + 1:] if "--" in argv else None
    if cmd is not None:
        argv = argv[:argv.index("--")]
    args = build_parser().parse_args(argv)
    if cmd is not None and hasattr(args, "cmd"):
        args.cmd = cmd
    try:
        return args.fn(args)
    except HarnessError as exc:
        _err(f"harness {args.command}: {exc}")
        return 1
    except KeyboardInterrupt:
        _err(f"harness {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
