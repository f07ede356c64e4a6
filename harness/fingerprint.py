"""The harness's code as a short hash: what a guest on another host, which
runs the harness from that host's checkout, must match the controller in."""

from __future__ import annotations

import hashlib
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
# Sources only: built files (the Cython output, the shared objects) follow them.
_SOURCES = (("harness", ("*.py", "*.pyx", "*.pxi", "*.pxd")), ("native", ("*.c", "*.h")))


def code_fingerprint(project: Path = PROJECT) -> str:
    h = hashlib.sha256()
    for top, patterns in _SOURCES:
        files = sorted({p for pat in patterns for p in (project / top).rglob(pat)})
        for p in files:
            h.update(f"{p.relative_to(project)}\0".encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]
