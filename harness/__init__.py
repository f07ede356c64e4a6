"""disagg-harness: LegoOS-style disaggregated systems as QEMU VMs or processes."""

from harness.errors import HarnessError

__all__ = ["HarnessError"]
__version__ = "0.1.0"
