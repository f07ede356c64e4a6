"""Snapshot keys: a start's own paths never change the key; what changes
the saved state does (the devices, the root image, a file of the project)."""

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from harness.vm import rootfs, snapshot
from harness.vm.qemu import PROJECT

from .test_qemu_cmd import cfg


def test_a_starts_own_paths_do_not_change_the_key(tmp_path):
    a, b = tmp_path / "a.ext4", tmp_path / "b.ext4"
    for d in (a, b):
        with open(d, "wb") as f:
            f.truncate(1 << 20)
    one = replace(cfg(snap=True, disk=a), run_dir=tmp_path / "run1", name="snode0")
    two = replace(cfg(snap=True, disk=b), run_dir=tmp_path / "run2", name="snode7")
    assert snapshot.key(one) == snapshot.key(two)
    with open(b, "wb") as f:
        f.truncate(2 << 20)  # a disk of another size is another device
    assert snapshot.key(one) != snapshot.key(two)


def test_devices_memory_and_root_change_the_key():
    base = cfg(snap=True, root="/cache/roots/1/root.erofs")
    assert snapshot.key(base) != snapshot.key(replace(base, root="/cache/roots/2/root.erofs"))
    assert snapshot.key(base) != snapshot.key(replace(base, memory=1 << 30))
    assert snapshot.key(base) != snapshot.key(replace(base, ports=["dh.ctl", "dh.go"]))


def test_what_cannot_be_snapshotted_says_why():
    assert "deterministic" in snapshot.why_not(cfg(deterministic=True))
    assert "stream" in snapshot.why_not(cfg(streams=[("dh.l0", "socket,path=/x")]))
    assert snapshot.why_not(cfg()) is None


def test_changing_a_project_file_changes_the_root_image_key():
    victim = PROJECT / "harness" / "text.py"
    st = victim.stat()
    before = rootfs._stat_key(rootfs.inputs())
    try:
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        assert rootfs._stat_key(rootfs.inputs()) != before
    finally:
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert rootfs._stat_key(rootfs.inputs()) == before


def test_the_root_image_holds_what_the_agent_runs_on():
    names = {str(p) for p in rootfs.inputs()}
    assert str(PROJECT / "harness" / "nodes" / "agent.py") in names
    assert any(n.endswith("/json/__init__.py") for n in names)
    assert not any("/test/" in n for n in names)  # the standard library's tests stay out
    assert shutil.which("fusermount3") in names  # the DBOS mount's auto_unmount runs it
    assert "sys.exit(main(['--wait'" in rootfs.launcher()


def test_the_per_start_line_has_time_entropy_and_parameters():
    a = snapshot.go_line({"dh.rundir": "/run/x", "dh.keep": "/tmp/p,/tmp/q"}).decode()
    b = snapshot.go_line({}).decode()
    ns, entropy, *params = a.split()
    assert abs(int(ns) / 1e9 - __import__("time").time()) < 5
    assert len(entropy) == 128 and entropy != b.split()[1]
    assert params == ["dh.rundir=/run/x", "dh.keep=/tmp/p,/tmp/q"]
    with pytest.raises(ValueError, match="spaces"):
        snapshot.go_line({"dh.rundir": "/run/a b"})


def test_symlinks_on_the_way_are_kept(tmp_path):
    """Merged /usr: /lib is a link to usr/lib; a file reached through it is
    staged at its real place with the link beside it."""
    (tmp_path / "src/usr/lib").mkdir(parents=True)
    (tmp_path / "src/usr/lib/libz.so").write_bytes(b"x")
    os.symlink("usr/lib", tmp_path / "src/lib")
    stage = tmp_path / "stage"
    rootfs._stage(stage, tmp_path / "src/lib/libz.so")
    inner = stage / (tmp_path / "src").relative_to("/")
    assert (inner / "lib").is_symlink()
    assert (inner / "usr/lib/libz.so").read_bytes() == b"x"
    assert Path(os.path.realpath(inner / "lib" / "libz.so")) == inner / "usr/lib/libz.so"
