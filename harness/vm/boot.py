"""`harness boot -- CMD`: one guest, one command, its output and status.

The command runs in the guest's chroot of the host root (read-only), in the
caller's working directory when the guest can see it. Its stdout and stderr
come back on two virtio-serial ports and are passed through as they arrive;
the guest's init reports the exit status on the console and powers off."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from harness import images
from harness.paths import data_dir, run_root
from harness.progress import Progress, silent
from harness.topology import ROLES
from harness.vm import accel, snapshot
from harness.vm.disk import ensure_ext4
from harness.vm.machine import EXIT_RE, RUN_RE, VM
from harness.vm.qemu import MachineConfig, guest_visible

SNODE_DISK = 256 << 20


def guest_script(argv: Sequence[str], cwd: str, env: dict[str, str]) -> str:
    """The shell script init runs in the guest's chroot."""
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    return (f"#!/bin/sh\n{exports}cd {shlex.quote(cwd)} 2>/dev/null || cd /\n"
            f"exec {shlex.join(argv)}\n")


def guest_env(deterministic: bool = False) -> dict[str, str]:
    """What a command in the guest inherits: the caller's PATH and Python
    setup; HOME is the guest's tmpfs (the host's root is read-only there).
    Deterministic runs also fix Python's hash seed: it changes how many
    instructions the interpreter executes."""
    env = {"HOME": "/tmp", "TERM": "dumb", "PYTHONDONTWRITEBYTECODE": "1",
           "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")}
    if deterministic:
        env["PYTHONHASHSEED"] = "0"
    for k in ("VIRTUAL_ENV", "PYTHONPATH", "LANG", "LC_ALL"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def _relay(src, dst: BinaryIO) -> None:
    while True:
        try:
            data = src.recv(65536)
        except OSError:
            return
        if not data:
            return
        dst.write(data)
        dst.flush()


def boot(argv: Sequence[str], role: str = "pnode", timeout: float = 300.0,
         deterministic: bool = False, memory: int = 512 << 20,
         progress: Progress | None = None, stdout: BinaryIO | None = None,
         stderr: BinaryIO | None = None, cold: bool = False) -> int:
    """Boots a guest (restores it from its snapshot unless cold), runs argv
    in it and returns its exit status."""
    if not argv:
        raise ValueError("harness boot needs a command after --")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    say = progress or silent
    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    image = images.build(progress=say)
    probe = accel.probe()
    run_dir = run_root() / f"boot.{os.getpid()}.{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    script = run_dir / "cmd.sh"
    script.write_text(guest_script(argv, os.getcwd(), guest_env(deterministic)))
    script.chmod(0o755)
    disk = ensure_ext4(data_dir() / "disks" / "boot-snode.ext4", SNODE_DISK) \
        if role == "snode" else None
    keep = guest_visible((Path.cwd(),))
    cfg = MachineConfig(name=f"boot-{role}", image=image, accel=probe, run_dir=run_dir,
                        script="cmd.sh", memory=memory, disk=disk,
                        ports=["dh.out", "dh.err"], deterministic=deterministic, keep=keep)
    if not cold and snapshot.why_not(cfg) is None:
        cfg = replace(cfg, snap=True, keep=[], ports=[*cfg.ports, snapshot.GO_PORT])
        say(f"restoring a {role} guest from its snapshot ({probe.accel})")
        vm = snapshot.start(cfg, snapshot.SNAP_RE, {"dh.rundir": str(run_dir.resolve()),
                                                    "dh.script": "cmd.sh",
                                                    "dh.keep": ",".join(map(str, keep))},
                            say=say)
    else:
        say(f"booting a {role} guest ({probe.accel}"
            f"{', deterministic' if deterministic else ''}; kernel {image.kernel_version})")
        vm = VM(cfg).launch()
    clean = False
    with vm:
        relays = [threading.Thread(target=_relay, args=(vm.ports[p], f), daemon=True)
                  for p, f in (("dh.out", out), ("dh.err", err))]
        for r in relays:
            r.start()
        vm.wait_for(RUN_RE, timeout, "DH-RUN (the guest's init starting the command)")
        say(f"guest up in {time.monotonic() - (vm.launched_at or 0):.2f} s; running "
            f"{shlex.join(argv)}")
        m = vm.wait_for(EXIT_RE, timeout, "DH-EXIT (the command's exit status)")
        vm.wait(10.0)  # init powers off after reporting
        for r in relays:
            r.join(5.0)
        code = int(m.group(1))
        clean = True
    if clean:
        shutil.rmtree(run_dir, ignore_errors=True)
    return code
