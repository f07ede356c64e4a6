"""Subcommands that need no cluster: doctor, mount, inspect, explore,
images, boot, bench."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from harness.errors import HarnessError
from harness.progress import indented, to_stderr
from harness.text import table


def cmd_doctor(args: argparse.Namespace) -> int:
    from harness.doctor import run_checks
    from harness.topology import load

    checks = run_checks(load(args.topology) if args.topology else None)
    if args.json:
        print(json.dumps({"checks": [c.__dict__ for c in checks]}))
    else:
        rows = [[c.name, "ok" if c.ok else ("MISSING" if c.required else "no"), c.detail,
                 "" if c.ok else c.fix] for c in checks]
        print(table(["check", "state", "detail", "fix"], rows))
    return 0 if all(c.ok or not c.required for c in checks) else 1


def cmd_mount(args: argparse.Namespace) -> int:
    from harness.dbos.mount import serve_native
    from harness.paths import data_dir

    path = Path(args.db) if args.db else data_dir() / "dbosfs.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    serve_native(path, args.mountpoint, args.task, ready=lambda: print(
        f"mounted {path} at {args.mountpoint}; Ctrl-C or `fusermount3 -u "
        f"{args.mountpoint}` unmounts", file=sys.stderr, flush=True))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from harness.isolation.inspect import DEFAULT_GATES, as_dicts, inspect_files

    if args.tree:
        if args.files:
            raise HarnessError("inspect: give files or --tree DIR..., not both")
        return _inspect_tree(args)
    if not args.files:
        raise HarnessError("inspect: give the ELF files to inspect, or --tree DIR...")

    findings, errors = inspect_files(args.files, DEFAULT_GATES + tuple(args.gate))
    if args.json:
        print(json.dumps({"findings": as_dicts(findings), "errors": errors}))
    else:
        for f in findings:
            print(f.line())
        for e in errors:
            to_stderr(e)
        to_stderr(f"{len(args.files)} file(s): {len(findings)} finding(s)"
                  + (f", {len(errors)} unreadable" if errors else ""))
    return 2 if errors else 1 if findings else 0


def _inspect_tree(args: argparse.Namespace) -> int:
    from harness.isolation.tree_scan import scan_tree

    out = scan_tree(args.tree, progress=None if args.json else indented)
    if args.json:
        print(json.dumps(out))
        return 0
    for f in out["files"]:
        for h in f["hits"]:
            where = "at an instruction boundary" if h["boundary"] else "inside an instruction"
            print(f"{f['path']}: {h['kind']} at {h['address']:#x} in {h['section']}, "
                  f"{h['symbol']}, {where}" + (", checked (safe)" if h["safe"] else ""))
    w, x = out["wrpkru"], out["xrstor"]
    print(table(["", "objects", "occurrences", "at a boundary", "inside", "safe"],
                [["inspected", str(out["objects"]), "", "", "", ""],
                 ["with WRPKRU", str(w["objects"]), str(w["occurrences"]), str(w["at_boundary"]),
                  str(w["inside"]), str(w["safe"])],
                 ["with XRSTOR", str(x["objects"]), str(x["occurrences"]), str(x["at_boundary"]),
                  str(x["inside"]), ""]], align="lrrrrr"))
    if out["unreadable"]:
        to_stderr(f"{len(out['unreadable'])} object(s) could not be parsed, e.g. "
                  f"{out['unreadable'][0]}")
    return 0


def cmd_explore(args: argparse.Namespace) -> int:
    from harness.isolation import explore as ex

    if not 0 < args.budget <= 1:
        raise HarnessError(f"--budget is a fraction of the fastest throughput, in (0, 1]; "
                           f"got {args.budget}")
    outcomes, notes = ex.run(args.config, args.placement, args.budget,
                             progress=None if args.json else indented)
    if args.plot:
        notes.append(f"plot: {ex.plot(outcomes, Path(args.plot))}")
    if args.json:
        print(json.dumps(ex.to_json(outcomes, notes)))
        return 0
    rows = [[o.name, f"{o.requests_per_s:,.0f}", str(len(o.dominated_by)),
             "*" if o.safest_in_budget else ""] for o in outcomes]
    print(table(["configuration", "requests/s", "safer configs", "safest in budget"], rows))
    for n in notes:
        print(n)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from harness import images

    if args.action == "build":
        img = images.build(progress=None if args.json else indented, force=args.force)
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
            print(table(["key", "kernel", "boots", "built"],
                        [[i.key, i.kernel_version, "vmlinux (PVH)" if i.vmlinux else "bzImage",
                          time.strftime("%Y-%m-%d %H:%M", time.localtime(i.built))]
                         for i in found]))
        else:
            to_stderr("no images yet; `harness images build` makes one")
    else:
        _freed(args, images.clean(), "the cached images and packages")
    return 0


def _freed(args: argparse.Namespace, freed: int, what: str) -> None:
    if args.json:
        print(json.dumps({"freed_bytes": freed}))
    else:
        to_stderr(f"removed {what} ({freed >> 20} MiB)")


def cmd_snapshot(args: argparse.Namespace) -> int:
    from harness.vm import snapshot

    if args.action == "build":
        from harness.nodes.cluster import Cluster
        from harness.topology import load

        # Starting the cluster takes each missing snapshot; it stops at once.
        topo = load(args.topology).with_placement("vm")
        say = None if args.json else indented
        Cluster(topo).start(timeout=args.timeout, progress=say).stop()
        found = snapshot.list_snapshots()
    elif args.action == "list":
        found = snapshot.list_snapshots()
    else:
        _freed(args, snapshot.clean(), "the snapshots and root images")
        return 0
    if args.json:
        print(json.dumps({"snapshots": [s.__dict__ for s in found]}))
    elif found:
        print(table(["key", "taken for", "state", "taken in", "taken"],
                    [[s.key, s.node, f"{s.bytes >> 20} MiB", f"{s.build_s:.1f} s",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(s.built))] for s in found]))
    else:
        to_stderr("no snapshots yet; the first start of a VM node (or `harness snapshot "
                  "build`) takes them")
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
                memory=parse_size(args.memory), cold=args.cold,
                progress=None if quiet else (lambda m: to_stderr(f"[boot] {m}")))


def cmd_bench(args: argparse.Namespace) -> int:
    progress = None if args.json else indented
    if args.rounds is None:
        args.rounds = 3 if args.which in ("apps", "dbosfs") else 5
    if args.which == "transport":
        from harness.bench import transport

        if args.network == "veth":
            if args.link != "tcp":
                raise HarnessError("--network veth crosses a network: use it with --link tcp")
            rep = transport.run_veth(n=args.n, progress=progress)
        else:
            rep = transport.run(link=args.link, n=args.n, progress=progress)
    elif args.which == "gates":
        from harness.bench import gates

        rep = gates.run(placement=args.placement, n=min(args.n, 20000),
                        deterministic=args.deterministic, progress=progress)
    elif args.which == "sqlite":
        from harness.bench import sqlite

        rep = sqlite.run(placement=args.placement, rounds=args.rounds, progress=progress)
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
    elif args.which == "dbosfs":
        from harness.bench import dbosfs

        if args.placement != "process":
            raise HarnessError("bench dbosfs runs on the host (--placement process): the "
                               "guests have no FUSE yet")
        rep = dbosfs.run(n=min(args.n, 2000), rounds=args.rounds, progress=progress)
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
