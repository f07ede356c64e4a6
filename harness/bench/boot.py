"""`harness bench boot`: how long a guest takes, beside a guest that does
nothing, measured in the same run with the same kernel and QEMU flags.

  bare_boot         launch -> QEMU gone, with an init that powers off at once
                    (the floor: kernel boot plus power-off)
  vm_boot_ready     launch -> the node agent's DH-READY line
  vm_exec_true      launch -> `true` ran in the guest -> QEMU gone
  vm_boot_ready_x3  three agents launched together -> all READY
  bare_boot_x3      three bare guests launched together -> all gone (its floor)
  cluster_ready     lego3 with every node in a VM: start -> every node answers
                    and every link answers (floor: bare_boot_x3)
  vm_restore_ready  launch -> DH-READY, the guest restored from its snapshot
                    (floor: bare_boot)
  cluster_restore_ready  lego3 restored from snapshots: start -> every node
                    and every link answers (floor: bare_boot, one guest)
  harness_boot_true_restored  `harness boot -- true` end to end from the
                    snapshot (floor: bare_boot)
  vng_exec_true     (with --vng) virtme-ng's `vng --exec true` on the same
                    kernel under TCG, end to end; its "floor" is
                    harness_boot_true, `harness boot --cold -- true` end to
                    end, so the ratio is our speed-up; vng_exec_true_restored
                    is the same against the restored boot

The rows without "restore" in their name boot cold (--cold); the snapshots
are taken before the first round, outside the timings.

Samples of the different rows are interleaved, so that the machine's noise
falls on all of them alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness import images
from harness.bench.report import Report, Row
from harness.errors import HarnessError
from harness.nodes.runners import READY_RE, VMRunner
from harness.paths import run_root
from harness.progress import Progress, silent
from harness.topology import Node
from harness.vm import accel
from harness.vm.machine import VM
from harness.vm.qemu import MachineConfig

TIMEOUT = 120.0


class _Ctx:
    def __init__(self, run_dir: Path, deterministic: bool) -> None:
        self.image = images.build()
        self.probe = accel.probe()
        self.run_dir = run_dir
        self.deterministic = deterministic
        self.serial = 0

    def name(self, kind: str) -> str:
        self.serial += 1
        return f"{kind}{self.serial}"


def _bare(ctx: _Ctx, count: int) -> float:
    vms = [VM(MachineConfig(name=ctx.name("bare"), image=ctx.image, accel=ctx.probe,
                            run_dir=ctx.run_dir, mode="bare", deterministic=ctx.deterministic))
           for _ in range(count)]
    t0 = time.monotonic()
    try:
        for vm in vms:
            vm.launch()
        for vm in vms:
            if vm.wait(TIMEOUT) is None:
                raise HarnessError(f"{vm.name}: a bare guest did not power off in {TIMEOUT:g} s")
        return time.monotonic() - t0
    finally:
        for vm in vms:
            vm.stop()


def _ready(ctx: _Ctx, count: int, cold: bool = True) -> float:
    runners = []
    for _ in range(count):
        node = Node(name=ctx.name("ready"), role="pnode", nid=1, placement="vm")
        runners.append(VMRunner(node, ctx.run_dir, ctx.image, ctx.probe, ctx.run_dir,
                                ctx.deterministic, cold=cold))
    t0 = time.monotonic()
    try:
        for r in runners:
            r.start("bench", [])
        for r in runners:
            r.settle()
        for r in runners:
            assert r.vm is not None
            r.vm.wait_for(READY_RE, TIMEOUT, "DH-READY")
        return time.monotonic() - t0
    finally:
        for r in runners:
            if r.vm is not None:
                r.vm.stop()


def _cluster(ctx: _Ctx, cold: bool = True) -> float:
    from harness.nodes.cluster import Cluster
    from harness.topology import load

    t0 = time.monotonic()
    c = Cluster(load("lego3").with_placement("vm"), deterministic=ctx.deterministic, cold=cold)
    try:
        c.start(timeout=TIMEOUT)
        return time.monotonic() - t0
    finally:
        c.stop()


def _exec_true(ctx: _Ctx) -> float:
    from harness.vm.boot import boot

    t0 = time.monotonic()
    code = boot(["true"], deterministic=ctx.deterministic, cold=True)
    if code != 0:
        raise HarnessError(f"`true` exited with status {code} in the guest")
    return time.monotonic() - t0


def _command(cmd: list[str], check: bool = True) -> float:
    # vng runs its helpers (virtme-run) from its own directory, by PATH
    env = {**os.environ, "PATH": f"{Path(cmd[0]).parent}{os.pathsep}{os.environ['PATH']}"}
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                       env=env)
    if b"Kernel panic" in p.stdout + p.stderr or (check and p.returncode):
        raise HarnessError(f"`{' '.join(cmd)}` exited with status {p.returncode}: "
                           f"{p.stderr.decode(errors='replace')[-500:]}")
    return time.monotonic() - t0


def run(n: int = 5, parallel: bool = True, vng: str | None = None,
        deterministic: bool = False, progress: Progress | None = None) -> Report:
    say = progress or silent
    run_dir = run_root() / f"bench-boot.{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        say("building or checking the guest image")
        ctx = _Ctx(run_dir, deterministic)
        samples: dict[str, list[float]] = {}
        steps: list[tuple[str, Callable[[], float]]] = [
            ("bare_boot", lambda: _bare(ctx, 1)),
            ("vm_boot_ready", lambda: _ready(ctx, 1)),
            ("vm_exec_true", lambda: _exec_true(ctx)),
        ]
        if parallel:
            steps += [("bare_boot_x3", lambda: _bare(ctx, 3)),
                      ("vm_boot_ready_x3", lambda: _ready(ctx, 3)),
                      ("cluster_ready", lambda: _cluster(ctx))]
        boot_true = [sys.executable, "-m", "harness.cli", "boot", "--", "true"]
        if not deterministic:  # an -icount guest counts from boot: no snapshot
            say("taking the snapshots (outside the timings)")
            _ready(ctx, 1, cold=False)
            _cluster(ctx, cold=False)
            _command(boot_true)
            steps += [("vm_restore_ready", lambda: _ready(ctx, 1, cold=False)),
                      ("harness_boot_true_restored", lambda: _command(boot_true))]
            if parallel:
                steps.append(("cluster_restore_ready", lambda: _cluster(ctx, cold=False)))
        if vng:
            kernel = ctx.image.kernel
            # vng exits 255 here even when the command ran (no virtio-serial
            # script ports: it falls back to the console), so only a panic fails it.
            steps += [("harness_boot_true", lambda: _command(
                          [*boot_true[:-2], "--cold", "--", "true"])),
                      ("vng_exec_true", lambda: _command(
                          [vng, "-r", kernel, "--disable-kvm", "--exec", "true"], check=False))]
        for i in range(n):
            for metric, fn in steps:
                say(f"round {i + 1}/{n}: {metric}")
                samples.setdefault(metric, []).append(fn() * 1000)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    floors = {"vm_boot_ready": "bare_boot", "vm_exec_true": "bare_boot",
              "vm_boot_ready_x3": "bare_boot_x3", "cluster_ready": "bare_boot_x3",
              "harness_boot_true": "bare_boot", "vm_restore_ready": "bare_boot",
              "cluster_restore_ready": "bare_boot", "harness_boot_true_restored": "bare_boot",
              "vng_exec_true": "harness_boot_true"}
    rep = Report("boot", placement="vm", accel=ctx.probe.accel)
    for metric, s in samples.items():
        floor = floors.get(metric)
        rep.rows.append(Row.of(metric, "ms", s, floor, samples[floor] if floor else None))
    if "vng_exec_true" in samples and "harness_boot_true_restored" in samples:
        rep.rows.append(Row.of("vng_exec_true_restored", "ms", samples["vng_exec_true"],
                               "harness_boot_true_restored",
                               samples["harness_boot_true_restored"]))
    rep.notes.append(f"kernel {ctx.image.kernel_version} booted as "
                     f"{'PVH vmlinux' if ctx.image.vmlinux else 'bzImage'}; {n} rounds; "
                     f"host cpus={os.cpu_count()}"
                     + ("; deterministic (-icount)" if deterministic else ""))
    return rep
