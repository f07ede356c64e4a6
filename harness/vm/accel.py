"""Which accelerator QEMU can really use here.

A /dev/kvm that exists is not enough: on some hosts QEMU aborts at the
first vCPU setup (`kvm_buf_set_msrs: Assertion ... failed`), and on others
(the kvm_pvm module) a boot sector runs while Debian's kernel dies in an
emulation failure or hangs. So KVM is chosen only when the guest kernel
itself, booted as guests boot it, gets as far as looking for its root file
system (it is given none, so it panics there and QEMU exits). Otherwise TCG
with `-cpu max`, which also gives guests protection keys; TCG is checked
with a boot sector that writes to an isa-debug-exit port, ending QEMU with
status (0x31 << 1) | 1 = 99. The result is cached per QEMU binary, host
kernel, /dev/kvm and guest kernel."""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import LaunchError
from harness.paths import cache_dir

QEMU = "qemu-system-x86_64"
_EXIT_OK = 99
_BOOT_SECTOR = bytes([0xB0, 0x31,  # mov al, 0x31
                      0xE6, 0xF4,  # out 0xf4, al  -> isa-debug-exit
                      0xF4,        # hlt
                      0xEB, 0xFE])  # jmp $


@dataclass
class AccelProbe:
    accel: str            # "kvm" or "tcg"
    cpu: str              # the -cpu model to use with it
    kvm_error: str        # why KVM was not chosen ("" when it was)
    qemu: str


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if not path:
        raise LaunchError(f"{QEMU} not found on PATH; install it with "
                          "`apt-get install qemu-system-x86` (scripts/setup.sh does this)")
    return path


# Printed once the kernel is up and looks for its root: past the decompressor,
# the early boot and every CPU feature the kernel uses at start.
_KERNEL_UP = b"VFS: Unable to mount root"
KERNEL_TIMEOUT = 15.0  # under working KVM this takes well under a second


def _boot_kernel(qemu: str, kernel: Path, timeout: float = KERNEL_TIMEOUT) -> tuple[bool, str]:
    cmd = [qemu, "-accel", "kvm", "-machine", "pc", "-cpu", "host", "-m", "128", "-nographic",
           "-nodefaults", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
           "-append", "console=ttyS0 panic=-1 root=/dev/dh-probe-none"]
    # Both streams in one pipe, read as they come: a KVM failure pauses the
    # guest instead of ending QEMU, so stop at the first sign of either end.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and _KERNEL_UP not in out and b"KVM" not in out:
            if not select.select([p.stdout], [], [], 0.1)[0]:
                if p.poll() is not None:
                    break
                continue
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    if _KERNEL_UP in out:
        return True, ""
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    why = next((ln for ln in lines if "KVM" in ln or "error" in ln.lower()), "")
    if not why:
        why = (f"it did not reach its root file system within {timeout:g} s (the console's "
               f"last line: {lines[-1] if lines else 'none'})")
    return False, f"the guest kernel failed under KVM: {why}"


def _boot(qemu: str, accel: str, img: Path, timeout: float = 20.0) -> tuple[bool, str]:
    cmd = [qemu, "-accel", accel, "-machine", "pc", "-cpu", "host" if accel == "kvm" else "max",
           "-m", "16", "-nographic", "-nodefaults", "-no-reboot",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
           "-drive", f"file={img},format=raw,if=ide"]
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"the probe guest did not finish within {timeout:g} s under {accel}"
    if p.returncode == _EXIT_OK:
        return True, ""
    err = (p.stderr or p.stdout).decode(errors="replace").strip().splitlines()
    return False, (err[-1] if err else f"QEMU exited with status {p.returncode}")


def _key(qemu: str, kernel: Path) -> str:
    st = os.stat(qemu)
    kvm = os.stat("/dev/kvm").st_rdev if os.path.exists("/dev/kvm") else 0
    raw = f"{qemu}:{st.st_size}:{st.st_mtime_ns}:{os.uname().release}:{kvm}:{kernel}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def probe(refresh: bool = False, kernel: Path | None = None) -> AccelProbe:
    """The accelerator for guests of `kernel` (default: the harness's image,
    built if need be)."""
    qemu = qemu_binary()
    if kernel is None:
        from harness import images

        kernel = Path(images.build().boot_kernel)
    cache = cache_dir() / f"accel-{_key(qemu, kernel)}.json"
    if not refresh:
        try:
            return AccelProbe(**json.loads(cache.read_text()))
        except (OSError, ValueError, TypeError):
            pass
    with tempfile.TemporaryDirectory(prefix="dh-probe-") as d:
        img = Path(d) / "boot.img"
        img.write_bytes(_BOOT_SECTOR + bytes(510 - len(_BOOT_SECTOR)) + b"\x55\xaa")
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            kvm_ok, why = False, "/dev/kvm is missing or not accessible"
        else:
            kvm_ok, why = _boot_kernel(qemu, kernel)
        if kvm_ok:
            result = AccelProbe("kvm", "host", "", qemu)
        else:
            tcg_ok, tcg_why = _boot(qemu, "tcg", img)
            if not tcg_ok:
                raise LaunchError(f"QEMU cannot boot even a boot sector under TCG: {tcg_why}",
                                  cmdline=[qemu])
            result = AccelProbe("tcg", "max", why, qemu)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(asdict(result)))
    return result
