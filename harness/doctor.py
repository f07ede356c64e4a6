"""`harness doctor`: what this host has and lacks, each missing piece with
its fix. Every check really tries the thing (boots a probe guest, opens a
userfaultfd, allocates a protection key) rather than looking for a file."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from dataclasses import dataclass

from harness.errors import HarnessError
from harness.vm import accel

SYS_USERFAULTFD = 323
UFFD_USER_MODE_ONLY = 1


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def check_qemu() -> Check:
    path = shutil.which(accel.QEMU)
    if not path:
        return Check("qemu", False, f"{accel.QEMU} not found",
                     "apt-get install qemu-system-x86")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    return Check("qemu", True, out.stdout.splitlines()[0] if out.stdout else path)


def check_accel() -> Check:
    try:
        p = accel.probe()
    except HarnessError as exc:
        return Check("accel", False, str(exc), "apt-get install qemu-system-x86")
    if p.accel == "kvm":
        return Check("kvm", True, "a probe guest booted under KVM", required=False)
    return Check("kvm", False, f"KVM unusable ({p.kvm_error}); guests run under TCG -cpu max "
                 "(slower, but with protection keys)",
                 "none needed; for speed, a host where QEMU can use /dev/kvm", required=False)


def check_userfaultfd() -> Check:
    libc = _libc()
    fd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0 and ctypes.get_errno() == errno.EPERM:
        fd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
    if fd >= 0:
        os.close(fd)
        return Check("userfaultfd", True, "userfaultfd(2) works (ExCache can take real faults)")
    err = ctypes.get_errno()
    return Check("userfaultfd", False, f"userfaultfd(2) failed: {os.strerror(err)}",
                 "run as root, or `sysctl vm.unprivileged_userfaultfd=1`")


def check_pkeys() -> Check:
    libc = _libc()
    if not hasattr(libc, "pkey_alloc"):
        return Check("pkeys", False, "libc has no pkey_alloc", "glibc >= 2.27", required=False)
    key = libc.pkey_alloc(0, 0)
    if key >= 0:
        libc.pkey_free(key)
        return Check("pkeys", True, "pkey_alloc works: compartment backends none, mprotect, "
                     "mpk, vm", required=False)
    return Check("pkeys", False,
                 f"pkey_alloc failed ({os.strerror(ctypes.get_errno())}): this CPU has no PKU; "
                 "compartment backends here none, mprotect, vm; mpk in TCG guests (-cpu max)",
                 "none needed: use placement vm for mpk", required=False)


def check_busybox() -> Check:
    path = "/bin/busybox"
    if not os.path.exists(path):
        return Check("busybox", False, "no /bin/busybox (guest initramfs needs it)",
                     "apt-get install busybox-static")
    from elftools.elf.elffile import ELFFile  # only needed here
    with open(path, "rb") as f:
        static = not any(s.header.p_type == "PT_INTERP" for s in ELFFile(f).iter_segments())
    if not static:
        return Check("busybox", False, f"{path} is dynamically linked",
                     "apt-get install busybox-static")
    return Check("busybox", True, f"{path} is static")


def check_shm() -> Check:
    ok = os.access("/dev/shm", os.W_OK)
    return Check("shm", ok, "/dev/shm is writable" if ok else "/dev/shm is not writable",
                 "" if ok else "mount a tmpfs on /dev/shm")


def check_libvirt(uri: str = "qemu:///system", required: bool = False) -> Check:
    """Whether libvirt at uri answers and runs QEMU guests (placement "libvirt")."""
    from harness.vm import domain

    name = f"libvirt {uri}"
    try:
        conn = domain.connect(uri, timeout=5.0)
    except HarnessError as exc:
        local = domain.host_of(uri) == "this machine"
        return Check(name, False, str(exc).split(";")[0],
                     "bash scripts/setup.sh && bash scripts/libvirtd.sh" if local
                     else f"start libvirtd on {domain.host_of(uri)}", required)
    try:
        lib, hv = conn.getLibVersion(), conn.getVersion()
        caps = conn.getCapabilities()
    finally:
        conn.close()
    ver = f"libvirt {lib // 1000000}.{lib // 1000 % 1000}.{lib % 1000}"
    ver += f", QEMU {hv // 1000000}.{hv // 1000 % 1000}.{hv % 1000}"
    if "<domain type='qemu'" not in caps:
        return Check(name, False, f"{ver}, but no QEMU (TCG) guests",
                     "install qemu-system-x86 where libvirtd runs", required)
    return Check(name, True, ver)


def run_checks(topology: object = None) -> list[Check]:
    """This host's checks; with a topology, also every libvirt URI it names."""
    checks = [check_qemu(), check_accel(), check_userfaultfd(), check_pkeys(),
              check_busybox(), check_shm()]
    uris = sorted({n.host for n in getattr(topology, "nodes", ()) if n.placement == "libvirt"})
    if not uris:
        return [*checks, check_libvirt()]
    return [*checks, *(check_libvirt(u, required=True) for u in uris)]
