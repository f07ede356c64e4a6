"""Where the harness keeps what it builds and caches (XDG base dirs), and
the check that keeps its directories in shared places its own."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from harness.errors import HarnessError


def _xdg(override: str, xdg_var: str, default: str) -> Path:
    """$override if set, else $xdg_var/disagg-harness, else ~/default/disagg-harness."""
    if os.environ.get(override):
        return Path(os.environ[override])
    xdg = os.environ.get(xdg_var)
    return (Path(xdg) if xdg else Path.home() / default) / "disagg-harness"


def cache_dir() -> Path:
    """What can be rebuilt: images, downloaded packages, probe results."""
    return _xdg("HARNESS_CACHE_DIR", "XDG_CACHE_HOME", ".cache")


def data_dir() -> Path:
    """What must persist (disks that survive restarts)."""
    return _xdg("HARNESS_DATA_DIR", "XDG_DATA_HOME", ".local/share")


def prune_newest(parent: Path, marker: str, keep: int) -> list[Path]:
    """Keeps the `keep` newest (by mtime) entries of a cache directory that
    hold `marker`, removes the rest (other checkouts share the cache) and
    returns what it removed."""
    import shutil

    found = sorted((d for d in parent.iterdir() if (d / marker).is_file()),
                   key=lambda d: d.stat().st_mtime, reverse=True)
    for d in found[keep:]:
        shutil.rmtree(d, ignore_errors=True)
    return found[keep:]


def shm_root() -> Path:
    """Where clusters keep their shm channel files (one directory each)."""
    return Path("/dev/shm") / f"disagg-harness-{os.getuid()}"


_OWNER = "owner.pid"
_LOCK = ".lock"  # claims take turns on it


def shm_dir_of(run_dir: Path) -> Path:
    """The shm directory of the cluster in run_dir: run dirs with the same
    name elsewhere (pytest's, one set per session) get their own."""
    import hashlib

    tag = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:8]
    return shm_root() / f"{run_dir.name}-{tag}"


def claim_shm_dir(path: Path) -> None:
    """Makes a cluster's shm directory afresh, removing what dead runs left:
    its own leftover (a cluster starting in a run dir owns it), and every
    other one whose owner process is gone (a SIGKILLed harness cannot clean
    up, and /dev/shm is memory), with the dangling /dev/shm links of libvirt
    nodes into them. Claims take turns under a lock, so none sees another's
    directory between its making and its owner file. A live owner of this
    one (another harness on the same run dir) is refused, not robbed."""
    import fcntl
    import shutil

    root = private_dir(shm_root())  # checked before anything in it is removed
    with open(root / _LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        owner = _owner_of(path)
        if owner is not None and owner != os.getpid() and _alive(owner):
            raise HarnessError(f"process {owner} runs a cluster with this run directory "
                               f"({path.name} in {root}): stop it (`harness down`) or use "
                               "another run directory")
        for d in root.iterdir():
            if d.name != _LOCK and (d == path or not _alive(_owner_of(d))):
                shutil.rmtree(d, ignore_errors=True)
        for link in Path("/dev/shm").glob("dh-*.shm*"):
            if link.is_symlink() and not link.exists() and link.lstat().st_uid == os.getuid():
                link.unlink(missing_ok=True)
        private_dir(path)
        (path / _OWNER).write_text(str(os.getpid()))


def _owner_of(d: Path) -> int | None:
    try:
        return int((d / _OWNER).read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:  # no owner file (an old layout)
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # someone else's process
        return True
    except OSError:  # no such process
        return False
    return True


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Makes path, and each parent it lacks, mode 0700; or checks the one
    already there. A name in /tmp or /dev/shm can be taken first by anyone,
    who could then swap the channel files and sockets in it: path must be a
    real directory of this user, and every directory above it up to a
    sticky one of root's (/tmp, /dev/shm) or one of root's (from then on
    trusted) must be this user's or root's; none may be writable by group or
    others. Otherwise HarnessError names the directory and what to remove."""
    path = Path(os.path.abspath(path))
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    if missing:
        _check_private(p, path)  # before anything is made in it
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass  # someone made it meanwhile: checked below like any other
    _check_private(path, path)
    return path


def _refuse(d: Path, why: str) -> HarnessError:
    return HarnessError(
        f"{d} {why}, so another user could replace the harness's files in it; "
        f"remove it (rm -rf {d}; if it is not yours, its owner or root must) and run again")


def _check_private(d: Path, path: Path) -> None:
    """Checks d and the directories above it; path is the one asked for."""
    me = os.geteuid()
    while True:
        st = os.lstat(d)
        if stat.S_ISLNK(st.st_mode):
            if d == path or st.st_uid not in (me, 0):
                raise _refuse(d, "is a symbolic link")
            st = os.stat(d)  # a system link above us, like /var/run
        if not stat.S_ISDIR(st.st_mode):
            raise _refuse(d, "is not a directory")
        if st.st_uid != me and (d == path or st.st_uid != 0):
            raise _refuse(d, f"is owned by uid {st.st_uid}, not you (uid {me})")
        if d != path and st.st_uid == 0 and st.st_mode & stat.S_ISVTX:
            return  # /tmp, /dev/shm: shared by design, and nobody else may rename our entry
        if st.st_mode & 0o022:
            raise _refuse(d, f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")
        if d.parent == d or (d != path and st.st_uid == 0 and me != 0):
            return  # the root, or root's own directory: trusted from here up
        d = d.parent


def run_root() -> Path:
    """Where clusters keep their run directories (logs, state, sockets):
    made, or checked, private to this user (paths.private_dir)."""
    env = os.environ.get("HARNESS_RUN_DIR")
    if env:
        return private_dir(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return private_dir(Path(xdg) / "disagg-harness" if xdg
                       else Path(f"/tmp/disagg-harness-{os.getuid()}"))
