"""Subcommands that boot or talk to a cluster: up, status, down, sql, run,
fault, smoke, demo."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from harness.errors import ClusterError, HarnessError, NotSupported
from harness.progress import indented, to_stderr
from harness.text import table


def _mib(n: int | None) -> str:
    return f"{n >> 20} MiB" if n else "-"


def _status_table(nodes: list[dict]) -> str:
    return table(["node", "role", "state", "placement", "accel", "memory", "links", "boot"],
                 [[n["name"], n["role"], n["state"], n["placement"], n.get("accel") or "-",
                   _mib(n.get("memory")), ", ".join(n.get("links", [])) or "-",
                   f"{n['boot_s']:.2f} s" if n.get("boot_s") is not None else "-"]
                  for n in nodes])


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
    cluster = Cluster(topo, run_dir=run_dir, cold=args.cold)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        cluster.start(timeout=args.timeout, progress=indented)
        print(_status_table(cluster.status()), flush=True)
        to_stderr(f"cluster {topo.name} is up (logs in {run_dir}); `harness status` and "
                  "`harness down` work from another shell; Ctrl-C here stops it")
        try:
            control.serve(cluster, stop)
        except KeyboardInterrupt:
            pass
    finally:
        to_stderr(f"stopping {topo.name} ...")
        cluster.stop()
    to_stderr(f"cluster {topo.name} is down")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from harness.nodes import control

    try:
        state = control.request(args.name, "status", timeout=args.timeout)
        code = 0
    except ClusterError as exc:
        state, code = control.last_state(args.name), 1
        if not args.json:
            to_stderr(str(exc))
    if args.json:
        print(json.dumps(state or {"cluster": None, "nodes": []}))
    elif state:
        print(_status_table(state["nodes"]))
    return code


def cmd_down(args: argparse.Namespace) -> int:
    from harness.nodes import control

    control.request(args.name, "down", timeout=args.timeout)
    if not control.wait_gone(args.name, args.timeout):
        raise ClusterError(f"cluster {args.name!r} said it was stopping but its control "
                           f"socket is still there after {args.timeout:g} s")
    to_stderr(f"cluster {args.name} is down")
    return 0


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
        print(table(res["columns"], [["NULL" if v is None else str(v) for v in r]
                                     for r in res["rows"]]))
    else:
        to_stderr(f"{res['changes']} row(s) changed")
    return 0


def _files_path(spec: str | None) -> str | None:
    """The mount point --files dbos[:PATH] asks for (checked before booting)."""
    if spec is None:
        return None
    kind, _, path = spec.partition(":")
    if kind != "dbos" or (path and not path.startswith("/")):
        raise HarnessError(f"--files {spec}: give dbos, or dbos:/ABSOLUTE/PATH")
    return path or "/dbos"


@contextmanager
def _files(c, path: str | None, argv: list[str]) -> Iterator[tuple[int | None, dict | None]]:
    """The snode's DBOS file system mounted at path on the pnode for the run,
    its events under a new DBOS task. Yields (task, files): for a pnode
    process the mount is this host's, served here (files is None); for a
    pnode guest, files is what Cluster.exec hands the pnode's agent, which
    mounts it over its own snode link."""
    if path is None:
        yield None, None
        return
    if c.snode() is None:
        raise NotSupported(f"--files dbos: {c.name} has no snode to keep the files")
    now = time.time()
    [[task]] = c.sql("INSERT INTO tasks (state, command, created, started) VALUES "
                     "('running', ?, ?, ?) RETURNING task_id", (json.dumps(argv), now, now),
                     write=True)
    source = f"{c.name}/{c.snode()}"
    if next(n for n in c.topology.nodes if n.role == "pnode").placement != "process":
        yield task, {"path": path, "task": task, "source": source}
        return
    from harness.dbos.mount import mounted

    made = not os.path.exists(path)
    os.makedirs(path, exist_ok=True)
    try:
        with mounted(c.dbos.vfs, path, task=task, source=source):
            yield task, None
    finally:
        if made:
            with suppress(OSError):
                os.rmdir(path)


def cmd_run(args: argparse.Namespace) -> int:
    from harness.nodes.cluster import open_cluster
    from harness.topology import parse_size

    argv = args.cmd
    if not argv:
        raise HarnessError("give the command to run on the pnode after --")
    files = _files_path(args.files)
    say = (lambda m: to_stderr(f"[run] {m}")) if sys.stderr.isatty() else None
    if args.memory == "local" and not args.client and not args.stats_json:
        with open_cluster(args.topology, placement=args.placement, timeout=args.timeout,
                          progress=say, cold=args.cold) as c, \
                _files(c, files, argv) as (task, mount):
            pnode = next(n.name for n in c.topology.nodes if n.role == "pnode")
            r = c.exec(pnode, argv, timeout=args.timeout, files=mount)
            if task is not None:
                c.sql("UPDATE tasks SET state = ?, result = ?, finished = ? WHERE task_id = ?",
                      ("done" if r.returncode == 0 else "failed",
                       json.dumps({"exit": r.returncode}), time.time(), task), write=True)
        sys.stdout.buffer.write(r.stdout)
        sys.stderr.buffer.write(r.stderr)
        return r.returncode
    from harness.nodes.program import run_program, summary

    with open_cluster(args.topology, placement=args.placement, timeout=args.timeout,
                      memory_channels=args.channels, progress=say, cold=args.cold) as c, \
            _files(c, files, argv) as (task, mount):
        res = run_program(c, argv, memory=args.memory, cache=parse_size(args.cache),
                          policy=args.policy, prefetch=args.prefetch,
                          client=shlex.split(args.client) if args.client else None,
                          timeout=args.timeout, capture=False, task=task, files=mount)
    sys.stdout.buffer.write(res.stdout)
    sys.stderr.buffer.write(res.stderr)
    if res.client_returncode is not None:
        sys.stdout.buffer.write(res.client_stdout)
        sys.stderr.buffer.write(res.client_stderr)
    to_stderr(f"[run] {summary(res)}")
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(res.stats, indent=1) + "\n")
    code = res.returncode if res.returncode >= 0 else 128 - res.returncode
    return code or (res.client_returncode or 0)


def cmd_fault(args: argparse.Namespace) -> int:
    from harness.nodes import control

    control.request(args.name, "fault", timeout=args.timeout, node=args.node,
                    action=args.action)
    to_stderr(f"{args.action} {args.node}: done")
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from harness import smoke

    return smoke.run(timeout=args.timeout, cold=args.cold)


def cmd_demo(args: argparse.Namespace) -> int:
    from harness import demo

    return demo.run(placement=args.placement)
