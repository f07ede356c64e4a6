"""Child processes that must not outlive the harness."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Asks the kernel to SIGKILL this process when its parent dies (also
    when the parent is SIGKILLed). The parent is the *thread* that forked, so
    callers fork from threads that live as long as the child should. Exits
    at once if the parent already died before the request took effect."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
