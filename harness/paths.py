"""Where the harness keeps what it builds and caches (XDG base dirs)."""

from __future__ import annotations

import os
from pathlib import Path


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
