"""Disk images for guests: raw files with ext4, made on the host."""

from __future__ import annotations

import subprocess
from pathlib import Path

from harness.errors import ImageError


def ensure_ext4(path: Path, size: int, seed: Path | None = None) -> Path:
    """An ext4 image at path: made (sparse) if missing, kept as it is otherwise,
    so whatever a guest wrote survives the next boot. A new one holds the
    files of the directory seed (mkfs.ext4 -d), if given."""
    if path.exists():
        return path
    if size < (8 << 20):
        raise ImageError(f"{path}: a disk needs at least 8 MiB, got {size} bytes")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".new")
    with open(tmp, "wb") as f:
        f.truncate(size)
    try:
        p = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "dh-data",
                            "-E", "lazy_itable_init=1,lazy_journal_init=1",
                            *(["-d", str(seed)] if seed else []), str(tmp)],
                           capture_output=True, text=True, timeout=120)
    except FileNotFoundError as exc:
        tmp.unlink(missing_ok=True)
        raise ImageError("mkfs.ext4 not found: `apt-get install e2fsprogs`") from exc
    if p.returncode:
        tmp.unlink(missing_ok=True)
        raise ImageError(f"mkfs.ext4 {tmp} failed: {p.stderr.strip()}")
    tmp.rename(path)
    return path
