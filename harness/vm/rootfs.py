"""The read-only root of a snapshot start: exactly what a node agent needs.

A guest whose state is saved cannot have the host root mounted over 9p
(a mounted export blocks migration), yet the agent runs the project's own
Python. So a node that starts from a snapshot boots from an erofs image of
the files the agent uses, at their host paths: the interpreter and the
shared objects it and its extension modules load (ldd), the standard
library without its tests and tools, the project's `harness` package, and
the installed distributions the agent imports in a guest (pyfuse3 and what
it requires, for the DBOS mount) and fusermount3. Uncompressed: under TCG decompression
costs more than reading.

The image is cached under a key made from every input file's path, size and
mtime (stat only: a start must not read 100 MB to know it is current), so a
change to any file of the project builds a new image, and with it new
snapshots. The shared objects are found while building; their stats are kept
in the manifest and checked at each start too (an apt upgrade of libc)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import ImageError
from harness.paths import cache_dir, prune_newest
from harness.progress import Progress, silent
from harness.vm.qemu import PROJECT

ROOTFS_VERSION = 1  # bump when this module changes what it writes
AGENT = "/.dh/agent"  # the launcher init starts in the image
CONTROL_DEV = "/dev/virtio-ports/dh.ctl"
# Not needed to run the agent; together most of the standard library's size.
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo",
               "lib2to3", "ensurepip", "pydoc_data", "unittest", "distutils"}
GUEST_DISTS = ("pyfuse3",)  # imported by the agent in a guest, with what they require
# Run by the agent itself: libfuse mounts through fusermount3 for auto_unmount.
GUEST_PROGRAMS = ("fusermount3",)
ETC = ("/etc/passwd", "/etc/group", "/etc/hosts", "/etc/nsswitch.conf")
KEEP_ROOTS = 4  # images kept for other checkouts sharing this cache


@dataclass
class RootImage:
    path: str        # the erofs image
    key: str
    files: int
    size: int        # bytes of files in it
    built: float


def roots_dir() -> Path:
    return cache_dir() / "roots"


def _walk(top: Path, skip: set[str] = frozenset()) -> list[Path]:
    out = []
    for dirpath, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith("config-")]
        for f in files:
            if not (f.endswith(".opt-1.pyc") or f.endswith(".opt-2.pyc")):
                out.append(Path(dirpath) / f)
    return out


def _dist_files(names: tuple[str, ...]) -> list[Path]:
    """The files of these distributions and of every one they require."""
    seen, todo, out = set(), list(names), []
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional requirement that is not installed
        out += [Path(dist.locate_file(f)) for f in dist.files or []]
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return [p for p in out if p.is_file()]


def inputs() -> list[Path]:
    """Every file the image holds except the shared objects (found by ldd)."""
    venv = Path(sys.prefix)
    base_exe = Path(os.path.realpath(sys.executable))
    files = [base_exe, *(Path(p) for p in ETC if os.path.exists(p))]
    files += [Path(p) for p in map(shutil.which, GUEST_PROGRAMS) if p]
    files += [p for p in (venv / "bin").glob("python*")]
    if (venv / "pyvenv.cfg").is_file():
        files.append(venv / "pyvenv.cfg")
    files += _walk(Path(sysconfig.get_paths()["stdlib"]), STDLIB_SKIP)
    dynload = Path(sysconfig.get_config_var("DESTSHARED") or "")
    if dynload.is_dir():
        files += _walk(dynload)
    files += _walk(PROJECT / "harness")
    files += _dist_files(GUEST_DISTS)
    return sorted(set(files))


def _stat_key(files: list[Path]) -> str:
    h = hashlib.sha256(f"{ROOTFS_VERSION}\0{launcher()}\0".encode())
    for p in files:
        st = p.lstat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def launcher() -> str:
    """/.dh/agent: the agent, waiting for its spec on the control port."""
    return (f"#!{sys.executable} -S\nimport sys\nsys.path[:0] = [{str(PROJECT)!r}]\n"
            "from harness.nodes.agent import main\n"
            f"sys.exit(main(['--wait', {CONTROL_DEV!r}]))\n")


LDD_RE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def shared_objects(elves: list[Path]) -> list[Path]:
    """The shared objects these ELF files load, the dynamic loader too."""
    found: set[Path] = set()
    for i in range(0, len(elves), 64):  # ldd takes many files at once
        p = subprocess.run(["ldd", *map(str, elves[i:i + 64])], capture_output=True,
                           text=True, timeout=120, check=False)
        for line in p.stdout.splitlines():
            m = LDD_RE.search(line)
            if m:
                found.add(Path(m.group(1)))
    return sorted(found)


def _hops(p: Path) -> list[Path]:
    """What a symlink points to, hop by hop (python3 -> python3.11)."""
    out: list[Path] = []
    while p.is_symlink() and len(out) < 40:
        p = Path(os.path.normpath(p.parent / os.readlink(p)))
        out.append(p)
    return out


def _is_elf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _load(d: Path, key: str) -> RootImage | None:
    try:
        man = json.loads((d / "manifest.json").read_text())
        img = RootImage(**man["image"])
        for path, size, mtime in man["libs"]:
            st = os.stat(path)
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                return None
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return img if img.key == key and Path(img.path).is_file() else None


def _stage(dest: Path, src: Path) -> None:
    """src at its own path under dest. A symlink stays one, and so do the
    directory symlinks on its way (merged /usr: /lib -> usr/lib), so every
    path the host resolves resolves the same way in the image."""
    parent = Path("/")
    for part in src.parent.parts[1:]:
        cur = parent / part
        if cur.is_symlink():
            link = dest / cur.relative_to("/")
            if not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.readlink(cur), link)
            parent = Path(os.path.realpath(cur))
        else:
            parent = cur
    to = dest / parent.relative_to("/") / src.name
    to.parent.mkdir(parents=True, exist_ok=True)
    if to.exists() or to.is_symlink():
        return  # reached by another path
    if src.is_symlink():
        os.symlink(os.readlink(src), to)
        return
    try:
        os.link(src, to)  # same file system: no copy
    except OSError:
        shutil.copy2(src, to)


def build(progress: Progress | None = None) -> RootImage:
    """The current root image, built if any input changed."""
    say = progress or silent
    files = inputs()
    key = _stat_key(files)
    out = roots_dir() / key
    if (img := _load(out, key)) is not None:
        return img
    if shutil.which("mkfs.erofs") is None:
        raise ImageError("mkfs.erofs not found: `apt-get install erofs-utils` "
                         "(scripts/setup.sh does this), or start with --cold")
    t0 = time.monotonic()
    say(f"building the guest root image for snapshot starts ({len(files)} files)")
    libs = shared_objects([p for p in files if not p.is_symlink() and _is_elf(p)])
    libs += [hop for p in files + libs for hop in _hops(p)]
    roots_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stage.", dir=roots_dir()) as tmp:
        stage = Path(tmp) / "root"
        for p in sorted(set(files + libs)):
            _stage(stage, p)
        (stage / AGENT.lstrip("/")).parent.mkdir(parents=True)
        (stage / AGENT.lstrip("/")).write_text(launcher())
        (stage / AGENT.lstrip("/")).chmod(0o755)
        for d in ("tmp", "run", "dev", "proc", "sys"):
            (stage / d).mkdir(exist_ok=True)
        part = Path(tmp) / "root.erofs"
        p = subprocess.run(["mkfs.erofs", "--quiet", "--all-root", str(part), str(stage)],
                           capture_output=True, text=True, timeout=300, check=False)
        if p.returncode:
            raise ImageError(f"mkfs.erofs failed: {p.stderr.strip()[-500:]}")
        size = sum(f.lstat().st_size for f in files + libs)
        img = RootImage(path=str(out / "root.erofs"), key=key, files=len(files) + len(libs),
                        size=size, built=time.time())
        final = Path(tmp) / "out"
        final.mkdir()
        part.rename(final / "root.erofs")
        libstats = [(str(lib), (st := lib.stat()).st_size, st.st_mtime_ns) for lib in libs]
        (final / "manifest.json").write_text(json.dumps({"image": asdict(img),
                                                         "libs": libstats}, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        final.rename(out)  # atomic: a reader sees a whole image or none
    prune_newest(roots_dir(), "manifest.json", KEEP_ROOTS)
    say(f"root image {key}: {img.files} files, {img.size >> 20} MiB, "
        f"built in {time.monotonic() - t0:.1f} s")
    return img

