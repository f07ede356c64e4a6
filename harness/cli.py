"""`harness …`: the command line. Every subcommand has --help; those that
report take --json. The subcommands themselves are in `harness.commands`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from harness.commands import cluster, standalone
from harness.errors import HarnessError
from harness.progress import to_stderr


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

    sp = add("doctor", standalone.cmd_doctor, "what this host has and lacks, each with its fix",
             True)
    sp.add_argument("--topology", metavar="FILE",
                    help="also check that every libvirt URI (host) of this topology answers")

    sp = add("up", cluster.cmd_up, "boot a cluster and keep it up until Ctrl-C or `harness down`")
    sp.add_argument("topology", nargs="?", default="lego3",
                    help="a built-in topology name or a .toml file (default: lego3)")
    sp.add_argument("--placement", choices=["process", "vm", "libvirt"],
                    help="run every node this way (default: as the topology says); libvirt: "
                    "as domains of the libvirt daemon at each node's host (qemu:///system)")
    sp.add_argument("--timeout", type=float, default=60.0,
                    help="seconds to wait for every node to be ready (default: 60)")
    sp.add_argument("--cold", action="store_true",
                    help="boot VM nodes instead of restoring their snapshots")

    for name, fn, help_ in (("status", cluster.cmd_status, "list the nodes of a running cluster"),
                            ("down", cluster.cmd_down, "stop a cluster started with `harness up`")):
        sp = add(name, fn, help_, json_flag=name == "status")
        sp.add_argument("--name", default="lego3",
                        help="the cluster (topology) name (default: lego3)")
        sp.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for an answer (default: 10)")

    sp = add("sql", cluster.cmd_sql, "query the DBOS tables: of the running cluster's snode, "
             "or of a local file with --db (a new file gets the schema)", True)
    sp.add_argument("query", help="one SQL statement")
    sp.add_argument("params", nargs="*", help="values for the statement's ? placeholders")
    sp.add_argument("--db", metavar="FILE", help="a local DBOS database file instead of a cluster")
    sp.add_argument("--write", action="store_true",
                    help="allow the statement to change data (refused without it)")
    sp.add_argument("--name", default="lego3", help="the cluster (default: lego3)")

    sp = add("mount", standalone.cmd_mount, "mount the DBOS file system (files as SQL tables) "
             "at MOUNTPOINT with FUSE; serves until Ctrl-C or `fusermount3 -u MOUNTPOINT`")
    sp.add_argument("mountpoint", help="an existing directory")
    sp.add_argument("--db", metavar="FILE",
                    help="the DBOS database file (default: dbosfs.sqlite in the harness's "
                         "data directory; a new file gets the schema)")
    sp.add_argument("--task", type=int, metavar="ID",
                    help="the DBOS task the provenance events of this mount belong to")

    sp = add("inspect", standalone.cmd_inspect, "find WRPKRU/XRSTOR outside registered gates "
             "in ELF files (ERIM's rules); exit 0 clean, 1 findings, 2 unreadable", True)
    sp.add_argument("files", nargs="*", metavar="FILE")
    sp.add_argument("--tree", nargs="+", metavar="DIR",
                    help="ERIM's scan of a distribution: every ELF object under DIR..., "
                         "summarised (exit 0 once the scan is done)")
    sp.add_argument("--gate", action="append", default=[], metavar="PREFIX",
                    help="functions whose names start with PREFIX are gates (repeatable)")

    sp = add("explore", standalone.cmd_explore, "run every assignment of components to isolation "
             "backends; mark the safest within a throughput budget", True)
    sp.add_argument("config", help="the workload and backends to explore (TOML)")
    sp.add_argument("--budget", type=float, default=0.5,
                    help="keep configurations with at least this fraction of the fastest "
                         "one's throughput (default: 0.5)")
    sp.add_argument("--placement", choices=["process", "vm"], default="process",
                    help="vm: explore in a guest, where mpk is real (default: process)")
    sp.add_argument("--plot", metavar="PNG", default="explore.png",
                    help="where to draw the design space (default: explore.png; '' for none)")

    sp = add("images", standalone.cmd_images, "guest kernel + initramfs: built once and cached",
             True)
    sp.add_argument("action", choices=["build", "list", "clean"])
    sp.add_argument("--force", action="store_true", help="build: rebuild even if up to date")

    sp = add("boot", standalone.cmd_boot, "boot one guest, run CMD in it, pass its output through, "
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
    sp.add_argument("--cold", action="store_true",
                    help="boot the guest instead of restoring its snapshot")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    sp = add("snapshot", standalone.cmd_snapshot, "saved VM states that nodes and `harness "
             "boot` start from: taken on first use, cached by what changes them", True)
    sp.add_argument("action", choices=["build", "list", "clean"])
    sp.add_argument("topology", nargs="?", default="lego3",
                    help="build: the topology whose VM nodes to snapshot (default: lego3)")
    sp.add_argument("--timeout", type=float, default=180.0,
                    help="build: seconds to wait for the nodes (default: 180)")

    sp = add("bench", standalone.cmd_bench, "run a benchmark; every row is reported beside its "
             "floor", True)
    sp.add_argument("which", choices=["transport", "boot", "dbos", "dbosfs", "paging", "gates",
                                      "sqlite", "reliability", "apps"],
                    help="the benchmark")
    sp.add_argument("--plot", metavar="PNG",
                    help="paging, apps: where to draw the cache-size sweep (default: "
                         "paging-sweep.png, apps-slowdown.png; '' for none)")
    sp.add_argument("--placement", choices=["process", "vm"], default="process",
                    help="dbos, gates, sqlite: on the host or in a guest; paging, apps: the "
                         "mnode and the workload as processes, or both in VMs (default: "
                         "process)")
    sp.add_argument("--link", choices=["shm", "unix", "tcp"], default="shm",
                    help="transport benchmark: the kind of link (default: shm)")
    sp.add_argument("--network", choices=["loopback", "veth"], default="loopback",
                    help="transport --link tcp: veth crosses a veth pair to a network "
                    "namespace, shaped to the rdma and 25gbe figures, beside the link model "
                    "of each (needs root; default: loopback)")
    sp.add_argument("-n", type=int, default=20000,
                    help="samples per row: transport round trips (default: 20000); dbos "
                         "operations, dbosfs creates (capped at 2000)")
    sp.add_argument("--rounds", type=int,
                    help="boot: samples per row; paging: runs per sweep point; sqlite: rounds "
                         "per backend (default: 5); apps: runs per app and cache size "
                         "(default: 3); dbosfs: rounds of seqwrite_1m and git_commit_tree "
                         "(default: 3)")
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
    sp = add("run", cluster.cmd_run, "boot a cluster, run CMD on its pnode, tear down; exits with "
             "CMD's status")
    sp.add_argument("topology", nargs="?", default="lego3")
    sp.add_argument("--placement", choices=["process", "vm", "libvirt"])
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
    sp.add_argument("--files", metavar="dbos[:PATH]",
                    help="mount the snode's DBOS file system at PATH on the pnode for CMD "
                         "(default PATH: /dbos); every file operation is served by the snode's "
                         "tables and logged in its events")
    sp.add_argument("--channels", type=int, default=4,
                    help="memory channels in the pnode guest (placement vm): processes that "
                    "can be on remote memory at once (default: 4)")
    sp.add_argument("--cold", action="store_true",
                    help="boot VM nodes instead of restoring their snapshots")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    sp = add("fault", cluster.cmd_fault, "inject a fault into a node of a running cluster")
    sp.add_argument("action", choices=["kill", "pause", "resume", "restart"])
    sp.add_argument("node")
    sp.add_argument("--name", default="lego3", help="the cluster (default: lego3)")
    sp.add_argument("--timeout", type=float, default=180.0,
                    help="seconds to wait (a restart waits for the node; default: 180)")

    sp = add("smoke", cluster.cmd_smoke, "the CI smoke boot: VM cluster, a remote page, an MPK "
             "fault, a SQL query; each phase timed")
    sp.add_argument("--timeout", type=float, default=180.0)
    sp.add_argument("--cold", action="store_true",
                    help="boot VM nodes instead of restoring their snapshots")

    sp = add("demo", cluster.cmd_demo, "the main job: boot the VM cluster, run the workloads, "
             "write a report")
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
        to_stderr(f"harness {args.command}: {exc}")
        return 1
    except KeyboardInterrupt:
        to_stderr(f"harness {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
