"""Which accelerator QEMU can really use here.

A /dev/kvm that exists is not enough: on some hosts QEMU aborts at the
first vCPU setup (`kvm_buf_set_msrs: Assertion ... failed`). So the probe
boots a real guest: a 512-byte boot sector that writes to an isa-debug-exit
port, which ends QEMU with status (0x31 << 1) | 1 = 99. KVM is chosen only
when that guest ran under it; otherwise TCG with `-cpu max`, which also gives
guests protection keys. The result is cached per QEMU binary, host kernel
and /dev/kvm."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
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


def _key(qemu: str) -> str:
    st = os.stat(qemu)
    kvm = os.stat("/dev/kvm").st_rdev if os.path.exists("/dev/kvm") else 0
    raw = f"{qemu}:{st.st_size}:{st.st_mtime_ns}:{os.uname().release}:{kvm}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def probe(refresh: bool = False) -> AccelProbe:
    qemu = qemu_binary()
    cache = cache_dir() / f"accel-{_key(qemu)}.json"
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
            kvm_ok, why = _boot(qemu, "kvm", img)
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
