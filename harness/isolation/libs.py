"""Real C libraries in compartments: Debian's SQLite (`pkey.SQLiteBox`) and
zlib (`pkey.ZBox`), unmodified, their memory in their compartment's heap and
every call a gate written in C. For the `rpc` backend a library lives in a
node of its own: `remote_open` there makes its box, and `remote_sqlite` and
`remote_compress` are the functions its gate calls (module-level, so the
node can import them)."""

from __future__ import annotations

from harness._native import pkey

LIBRARIES = ("sqlite", "zlib")
HEAP = {"sqlite": 64 << 20, "zlib": 2 << 20}  # zlib's deflate state at level 6: ~270 KiB


def open_box(library: str, compartment: pkey.Compartment, private_stack: bool = False,
             level: int = 6) -> pkey.SQLiteBox | pkey.ZBox:
    """library's box in compartment; level is zlib's."""
    if library == "sqlite":
        return pkey.SQLiteBox(compartment, private_stack=private_stack)
    return pkey.ZBox(compartment, private_stack=private_stack, level=level)


_boxes: dict[str, pkey.SQLiteBox | pkey.ZBox] = {}  # in an rpc compartment's node


def remote_open(library: str, level: int = 6) -> None:
    _boxes[library] = open_box(library, pkey.Compartment(library, "none", HEAP[library]),
                               level=level)


def remote_sqlite(sql: str) -> list:
    return _boxes["sqlite"].execute(sql)


def remote_compress(data: bytes) -> bytes:
    return _boxes["zlib"].compress(data)
