"""The harness's directories in shared places (/tmp/disagg-harness-<uid>,
/dev/shm/disagg-harness-<uid>) have predictable names: another local user
could make one first and swap channel files in it. They are made 0700, and
one that is not this user's, or that others can write, is refused with a
message that says what to remove. Channel files are opened without
following a symbolic link."""

import os
import stat
import subprocess

import pytest

from harness import paths
from harness._native import transport as t
from harness.errors import HarnessError, TransportError
from harness.nodes import cluster as cluster_mod
from harness.topology import load


def mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_a_new_directory_and_its_missing_parents_are_private(tmp_path):
    d = paths.private_dir(tmp_path / "a" / "b")
    assert d == tmp_path / "a" / "b"
    assert mode(tmp_path / "a") == 0o700 and mode(d) == 0o700
    assert paths.private_dir(d) == d  # an existing private one is accepted


@pytest.mark.parametrize("bits", [0o020, 0o002, 0o777])
def test_a_directory_others_can_write_is_refused(tmp_path, bits):
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o700 | bits)
    with pytest.raises(HarnessError, match=rf"{d} is writable by group or others.*rm -rf {d}"):
        paths.private_dir(d)


def test_a_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    monkeypatch.setattr(paths.os, "geteuid", lambda: os.stat(d).st_uid + 4242)
    with pytest.raises(HarnessError, match=rf"{d} is owned by uid \d+, not you.*remove it"):
        paths.private_dir(d)


def test_a_symbolic_link_in_its_place_is_refused(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(HarnessError, match="is a symbolic link"):
        paths.private_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(HarnessError, match="is not a directory"):
        paths.private_dir(tmp_path / "file")


def test_a_parent_others_can_write_is_refused_unless_sticky(tmp_path):
    """Like /tmp/disagg-harness-<uid> made 0777 by someone: a private run
    directory inside it would not stay ours."""
    top = tmp_path / "top"
    top.mkdir()
    top.chmod(0o777)
    with pytest.raises(HarnessError, match=rf"{top} is writable by group or others"):
        paths.private_dir(top / "run")
    top.chmod(0o1777)  # sticky and root's, as /tmp itself is: only if root owns it
    if os.stat(top).st_uid == 0:
        assert mode(paths.private_dir(top / "run")) == 0o700


def test_run_root_refuses_a_shared_directory(tmp_path, monkeypatch):
    bad = tmp_path / "runs"
    bad.mkdir()
    bad.chmod(0o777)
    monkeypatch.setenv("HARNESS_RUN_DIR", str(bad))
    with pytest.raises(HarnessError, match="writable by group or others"):
        paths.run_root()


def test_a_cluster_refuses_a_hostile_shm_directory(tmp_path, monkeypatch):
    """The cluster makes its /dev/shm directory through the same check."""
    bad = tmp_path / "shm"
    bad.mkdir()
    bad.chmod(0o777)
    monkeypatch.setattr(paths, "shm_root", lambda: bad)
    c = cluster_mod.Cluster(load("lego3"), run_dir=tmp_path / "run")
    with pytest.raises(HarnessError, match=rf"{bad} is writable by group or others"):
        c.start(timeout=5)
    assert list(bad.iterdir()) == []  # nothing was made in it


def test_the_default_shm_root_is_per_user():
    assert paths.shm_root() == paths.Path(f"/dev/shm/disagg-harness-{os.getuid()}")


def test_channel_files_are_not_opened_through_a_symbolic_link(tmp_path):
    real = tmp_path / "real.shm"
    t.create_shm_file(str(real), 64 << 10)
    (tmp_path / "swapped.shm").symlink_to(real)
    with pytest.raises(TransportError, match="symbolic links"):
        t.Link.shm_open(str(tmp_path / "swapped.shm"), 1)
    with pytest.raises(TransportError, match="symbolic links"):
        t.reset_shm_file(str(tmp_path / "swapped.shm"))
    with pytest.raises(TransportError):
        t.create_shm_file(str(tmp_path / "swapped.shm"), 64 << 10)
    t.Link.shm_open(str(real), 1).close()  # the file itself opens


def test_a_cluster_shm_dir_is_its_run_dirs_alone_and_dead_runs_leftovers_go(tmp_path, monkeypatch):
    root = tmp_path / "shm"
    monkeypatch.setattr(paths, "shm_root", lambda: root)
    # pytest's run dirs share names across sessions; their shm dirs do not.
    mine = paths.shm_dir_of(tmp_path / "a" / "test_x0")
    assert mine != paths.shm_dir_of(tmp_path / "b" / "test_x0")
    assert mine.name.startswith("test_x0-")
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        for name, owner in [(mine.name, os.getpid()), ("other-live", live.pid),
                            ("other-dead", dead.pid), ("no-owner", None)]:
            d = paths.private_dir(root / name)
            (d / "ch.shm").write_bytes(b"x")
            if owner is not None:
                (d / "owner.pid").write_text(str(owner))
        link = paths.Path(f"/dev/shm/dh-{tmp_path.name}-gone.shm0")
        link.symlink_to(root / "other-dead" / "ch.shm")
        paths.claim_shm_dir(mine)
        kept = sorted([mine.name, "other-live", ".lock"])
        assert sorted(d.name for d in root.iterdir()) == kept
        assert list(mine.iterdir()) == [mine / "owner.pid"]  # its own leftover went too
        assert not link.is_symlink()
        # A live harness on the same run dir keeps its cluster's channels.
        (mine / "owner.pid").write_text(str(live.pid))
        refusal = rf"process {live.pid} runs a cluster .*harness down"
        with pytest.raises(HarnessError, match=refusal):
            paths.claim_shm_dir(mine)
        assert (mine / "owner.pid").read_text() == str(live.pid)
    finally:
        live.kill()
        live.wait()
