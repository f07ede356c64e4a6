"""Cython bindings to the C core in native/: one module per C module."""

from pathlib import Path


def shared_object(stem: str) -> Path:
    """A shared object built with the package and loaded by path (not
    imported): the interposer, the FUSE floor."""
    found = sorted(Path(__file__).parent.glob(f"{stem}*.so"))
    if not found:
        from harness.errors import HarnessError

        raise HarnessError(f"harness/_native/{stem}*.so is not built; run `bash scripts/setup.sh`")
    return found[0]
