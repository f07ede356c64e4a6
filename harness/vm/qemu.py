"""QEMU command lines for harness guests.

One place decides every flag: the machine, the kernel and its parameters,
the 9p exports (the host root read-only, the run directory read-write),
virtio-serial ports and QMP as Unix sockets QEMU connects to (the VM
listens on them), the snode's disk, and the deterministic
(instruction-counting) mode."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.fingerprint import PROJECT  # the checkout whose code guests run
from harness.images import Image
from harness.vm.accel import AccelProbe

# Measured here under TCG: these take a busybox guest's boot to power-off from
# 1.98 s to 1.71 s. mitigations=off: speculation fixes cost time and protect
# nothing in an emulated CPU. pci=noacpi: PCI without ACPI's AML (IRQ routing
# from the BIOS's table): a restored guest's rescan for its ivshmem devices
# took 92-375 ms with it and 68-83 ms without; lego3's cold start 7.5-8.8 s
# and 6.2-6.8 s.
BOOT_PARAMS = ("console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off nokaslr "
               "tsc=reliable no_timer_check audit=0 cryptomgr.notests random.trust_cpu=on "
               "i8042.noaux i8042.nokbd i8042.nopnp 8250.nr_uarts=1 rcupdate.rcu_expedited=1 "
               "pci=noacpi")


IVSHMEM_SLOT = 0x10  # the first ivshmem device's PCI slot; the rest follow


def ivshmem_address(index: int) -> str:
    """Where the guest sees the index-th ivshmem device."""
    return f"0000:00:{IVSHMEM_SLOT + index:02x}.0"



# The guest mounts its own tmpfs here, hiding what the host has there.
SHADOWED = (Path("/tmp"), Path("/run"))


def guest_visible(extra: tuple[Path, ...] = ()) -> list[Path]:
    """Host paths under /tmp or /run that a guest must still see: the
    project (its code runs in the guest), the venv, and any extra ones (the
    caller's directory). Nested paths are covered by their parents."""
    paths = sorted({p.resolve() for p in (PROJECT, Path(sys.prefix), *extra)
                    if any(p.resolve().is_relative_to(s) for s in SHADOWED)})
    return [p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths)]


@dataclass
class MachineConfig:
    name: str
    image: Image
    accel: AccelProbe
    run_dir: Path                 # seen (read-only, through the host root) at /run/dh/run
    mode: str = "run"             # "run": init runs run_dir/script; "bare": powers off at once
    script: str = ""
    memory: int = 512 << 20
    cpus: int = 1
    disk: Path | None = None      # ext4 image, mounted at /run/dh/disk
    ports: list[str] = field(default_factory=list)  # virtio-serial port names
    # virtio-serial ports whose host side joins another guest's: (name, chardev
    # backend), e.g. ("dh.l0", "socket,path=/run/x.sock,server=on,wait=off")
    streams: list[tuple[str, str]] = field(default_factory=list)
    deterministic: bool = False   # -icount: in-guest time counts instructions
    keep: list[Path] = field(default_factory=guest_visible)  # see guest_visible()
    shm: list[Path] = field(default_factory=list)  # ivshmem files, at PCI slots 0x10, 0x11, ...
    extra_params: str = ""
    # The directory init runs the script from, when not run_dir (which a
    # guest on another host cannot see): a directory of the harness's checkout.
    guest_run_dir: str = ""
    # Snapshot starts (harness/vm/snapshot.py). snap: init stops at a
    # snapshot point and waits for the per-start line on the dh.go port;
    # root: the root image (rootfs.py) the guest boots from instead of 9p,
    # the agent waiting for its spec; incoming: QEMU waits for a saved state.
    snap: bool = False
    root: str | None = None
    incoming: bool = False
    # The guest's RAM in this file instead of anonymous memory: shared while
    # a snapshot is taken (the file is its memory), mapped copy-on-write by
    # a restore (ram_private), so no RAM is in the saved state to load.
    ram_file: Path | None = None
    ram_private: bool = False

    def port_socket(self, port: str) -> Path:
        return self.run_dir / f"{self.name}.{port}.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / f"{self.name}.qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / f"{self.name}.console.log"


def kernel_params(cfg: MachineConfig) -> str:
    """The guest kernel's command line: what init is to do, and where."""
    if cfg.mode not in ("run", "bare"):
        raise ValueError(f"mode must be 'run' or 'bare', got {cfg.mode!r}")
    params = [BOOT_PARAMS, f"dh.mode={cfg.mode}"]
    if cfg.snap:  # the run directory, script and kept paths come per start (dh-fresh)
        if cfg.root is not None and cfg.keep:
            params.append("dh.keep=" + ",".join(str(p) for p in cfg.keep))
    elif cfg.mode == "run":
        run_dir = cfg.guest_run_dir or str(cfg.run_dir.resolve())
        keep = ",".join(str(p) for p in cfg.keep)
        if any(c.isspace() or c == "," for c in run_dir + cfg.script + "".join(map(str, cfg.keep))):
            raise ValueError("paths a guest must see go on the kernel command line and must not "
                             f"contain spaces or commas: {run_dir}, {cfg.script}, {keep}")
        params += [f"dh.script={cfg.script}", f"dh.rundir={run_dir}"]
        if keep:
            params.append(f"dh.keep={keep}")
    if cfg.disk is not None:
        params.append("dh.disk=1")
    if cfg.root is not None:
        params.append("dh.root=image")
    elif cfg.snap:
        params.append("dh.snap=1")
    if cfg.deterministic:
        params.append("norandmaps")  # address layout changes instruction counts too
    if cfg.extra_params:
        params.append(cfg.extra_params)
    return " ".join(params)


def command(cfg: MachineConfig) -> list[str]:
    params = kernel_params(cfg)
    accel = cfg.accel.accel
    machine = "pc,memory-backend=pc.ram" if cfg.ram_file is not None else "pc"
    cmd = [cfg.accel.qemu, "-name", cfg.name,
           "-machine", machine, "-accel", accel, "-cpu", cfg.accel.cpu,
           "-m", f"{cfg.memory >> 20}M", "-smp", str(cfg.cpus),
           "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
           # QEMU's seccomp filter: no obsolete calls, no privilege changes, no
           # fork/exec, no scheduler or resource changes.
           "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
           "-serial", "stdio",
           "-kernel", cfg.image.boot_kernel, "-initrd", cfg.image.initramfs,
           "-append", params]
    if cfg.deterministic:
        if accel != "tcg":
            raise ValueError("deterministic mode needs TCG (-icount does not work with KVM)")
        # sleep=on: an idle guest (waiting on 9p, say) sleeps in real time. With
        # sleep=off its clock jumped to the next timer instead, often a peer's
        # timeout, so a wait on a host that was merely slow timed out at once.
        cmd += ["-icount", "shift=0,sleep=on,align=off", "-rtc", "clock=vm"]
    if cfg.mode == "run":
        cmd += ["-fsdev",
                "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"]
        if cfg.ports or cfg.streams:
            cmd += ["-device", "virtio-serial-pci,id=vser"]
        for i, port in enumerate(cfg.ports):
            cmd += ["-chardev", f"socket,id=port{i},path={cfg.port_socket(port)}",
                    "-device", f"virtserialport,bus=vser.0,chardev=port{i},name={port}"]
        for i, (port, backend) in enumerate(cfg.streams):
            kind, _, opts = backend.partition(",")
            cmd += ["-chardev", f"{kind},id=stream{i},{opts}",
                    "-device", f"virtserialport,bus=vser.0,chardev=stream{i},name={port}"]
        # A snapshot's build has no ivshmem devices, so none is in its state;
        # a restore has them from its start, unknown to the restored kernel
        # until the agent rescans the bus (harness/vm/snapshot.py).
        for i, path in enumerate(cfg.shm if cfg.incoming or not cfg.snap else []):
            cmd += ["-object", f"memory-backend-file,id=shm{i},mem-path={path},"
                    f"size={path.stat().st_size},share=on",
                    "-device", f"ivshmem-plain,memdev=shm{i},bus=pci.0,addr={IVSHMEM_SLOT + i:#x}"]
        if cfg.disk is not None:
            cmd += ["-drive", f"file={cfg.disk},format=raw,if=none,id=disk,cache=writeback",
                    "-device", "virtio-blk-pci,drive=disk"]
        if cfg.root is not None:
            cmd += ["-drive", f"file={cfg.root},format=raw,if=none,id=root,readonly=on",
                    "-device", "virtio-blk-pci,drive=root,serial=dhroot"]
    if cfg.ram_file is not None:
        cmd += ["-object", f"memory-backend-file,id=pc.ram,size={cfg.memory >> 20}M,"
                f"mem-path={cfg.ram_file},share={'off' if cfg.ram_private else 'on'}"]
    if cfg.snap:
        # Without the run state in the saved state, a restored guest runs as
        # soon as its state has loaded, not once the harness sees it loaded.
        cmd += ["-global", "migration.store-global-state=off"]
    if cfg.incoming:
        cmd += ["-incoming", "defer"]
    # QEMU makes its chardevs in command-line order and QMP's comes last, so
    # once QMP has connected, every socket before it is made (a stream's
    # listening one, too).
    cmd += ["-chardev", f"socket,id=qmp,path={cfg.qmp_socket}", "-mon", "chardev=qmp,mode=control"]
    return cmd
