"""Run a command in a guest and take its stdout, or the one JSON object it
prints: in a node of a running cluster, or in a guest booted for it alone."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError
from harness.text import tail

if TYPE_CHECKING:
    from harness.nodes.cluster import Cluster


def run_in_guest(argv: Sequence[str], what: str, *, cluster: Cluster | None = None,
                 node: str = "pnode0", timeout: float = 900.0, **boot_options: Any) -> bytes:
    """Runs argv on node of cluster, or without a cluster in a guest of its
    own (boot_options go to `harness.vm.boot.boot`), and returns its stdout.
    A non-zero status is a HarnessError naming what failed, with the end of
    its stderr."""
    if cluster is not None:
        r = cluster.exec(node, argv, timeout=timeout)
        code, out, err, where = r.returncode, r.stdout, r.stderr, f"on {node}"
    else:
        from harness.vm.boot import boot

        o, e = io.BytesIO(), io.BytesIO()
        code = boot(argv, timeout=timeout, stdout=o, stderr=e, **boot_options)
        out, err = o.getvalue(), e.getvalue()
        where = f"in the {boot_options.get('role', 'pnode')} guest"
    if code:
        raise HarnessError(f"{what} failed {where} (status {code}):\n{tail(err, 2000)}")
    return out


def guest_json(argv: Sequence[str], what: str, **options: Any) -> dict:
    """run_in_guest for a command that prints one JSON object: that object."""
    return json.loads(run_in_guest(argv, what, **options))
