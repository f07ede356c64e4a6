"""Text for people: aligned tables and the end of a command's output."""

from __future__ import annotations

from collections.abc import Sequence


def table(head: Sequence[str] | None, rows: Sequence[Sequence[str]], align: str = "") -> str:
    """Columns two spaces apart, a rule of dashes under head (none without
    one); align gives each column "l" or "r", and columns past it are "l"."""
    lines = [list(map(str, r)) for r in ([head] if head else []) + list(rows)]
    widths = [max(len(c) for c in col) for col in zip(*lines, strict=True)]
    if head:
        lines.insert(1, ["-" * w for w in widths])
    right = [i < len(align) and align[i] == "r" for i in range(len(widths))]
    return "\n".join("  ".join(c.rjust(w) if r else c.ljust(w)
                               for c, w, r in zip(line, widths, right, strict=True)).rstrip()
                     for line in lines)


def tail(b: bytes | None, n: int = 800) -> str:
    """The end of a program's output, for an error message."""
    return (b or b"").decode(errors="replace")[-n:].strip() or "-"
