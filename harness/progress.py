"""Progress lines: what a long step says while it runs, one line at a time."""

from __future__ import annotations

import sys
from collections.abc import Callable

Progress = Callable[[str], None]


def silent(_line: str) -> None:
    """The Progress of a caller that asked for none."""


def to_stderr(line: str) -> None:
    """A line for the person at the terminal; stdout is kept for results."""
    print(line, file=sys.stderr, flush=True)


def indented(line: str) -> None:
    """to_stderr, set in under the command's own lines."""
    to_stderr(f"  {line}")
