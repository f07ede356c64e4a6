"""disagg-harness: LegoOS-style disaggregated systems as QEMU VMs or processes.

    import harness
    with harness.open_cluster("lego3", placement="vm") as c:
        ...
"""

from harness.errors import HarnessError

__all__ = ["HarnessError", "open_cluster"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: a node agent imports this package in a guest, where every module
    # costs ~20x; the cluster machinery is for the controller only.
    if name == "open_cluster":
        from harness.nodes.cluster import open_cluster

        return open_cluster
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
