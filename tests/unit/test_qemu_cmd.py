"""The QEMU command line keeps its promises: seccomp on, the host root
exported read-only, instruction counting only when asked, no KVM flags under
TCG."""

from pathlib import Path

import pytest

from harness.images import Image
from harness.vm.accel import AccelProbe
from harness.vm.qemu import MachineConfig, command

IMAGE = Image(kernel="/k/vmlinuz", vmlinux="/k/vmlinux", initramfs="/k/initramfs.cpio",
              kernel_version="6.1", kernel_package="p", modules=[], key="x", built=0.0)
TCG = AccelProbe("tcg", "max", "no kvm", "/usr/bin/qemu-system-x86_64")


def cfg(**kw) -> MachineConfig:
    return MachineConfig(name="t", image=IMAGE, accel=TCG, run_dir=Path("/run/x"),
                         script="s", keep=[], **kw)


def test_sandbox_and_read_only_root():
    cmd = command(cfg())
    assert cmd[cmd.index("-sandbox") + 1].startswith("on,")
    fsdev = next(a for a in cmd if a.startswith("local,id=hostroot"))
    assert "readonly=on" in fsdev and "path=/," in fsdev
    assert cmd[cmd.index("-kernel") + 1] == "/k/vmlinux"  # the PVH vmlinux
    assert "-icount" not in cmd


def test_deterministic_mode():
    cmd = command(cfg(deterministic=True))
    assert cmd[cmd.index("-icount") + 1].startswith("shift=0,sleep=on")
    assert "norandmaps" in cmd[cmd.index("-append") + 1]
    with pytest.raises(ValueError, match="TCG"):
        command(MachineConfig(name="t", image=IMAGE, run_dir=Path("/r"), keep=[],
                              accel=AccelProbe("kvm", "host", "", "q"), deterministic=True))


def test_paths_with_spaces_are_refused():
    with pytest.raises(ValueError, match="spaces"):
        command(MachineConfig(name="t", image=IMAGE, accel=TCG, run_dir=Path("/a b"),
                              script="s", keep=[]))


def test_qemu_connects_to_the_vms_sockets_and_qmp_comes_last():
    cmd = command(cfg(ports=["dh.ctl"], streams=[("dh.s.l", "socket,path=/run/x/l.sock,"
                                                            "server=on,wait=off")]))
    chardevs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-chardev"]
    assert chardevs[0] == "socket,id=port0,path=/run/x/t.dh.ctl.sock"  # a client: the VM listens
    # QEMU makes chardevs in order: once QMP has connected, the stream listens.
    assert chardevs[-1] == "socket,id=qmp,path=/run/x/t.qmp.sock"
    assert cmd[-2:] == ["-mon", "chardev=qmp,mode=control"] and "-qmp" not in cmd
