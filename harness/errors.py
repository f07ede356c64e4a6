"""The harness's exceptions: one tree under HarnessError."""

from __future__ import annotations


class HarnessError(Exception):
    """Base of every error the harness raises on purpose."""


class NotSupported(HarnessError):
    """A capability this host (or this version of the harness) does not have."""


class TopologyError(HarnessError):
    """A topology file that does not validate; the message names file and key."""


class TransportError(HarnessError):
    """A link failed: the peer closed, a wait ran out, a system call failed."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class LinkClosed(TransportError):
    """The peer closed the link or died."""


class TransportTimeout(TransportError):
    """A send, receive or call did not complete within its timeout."""


class ProtocolError(TransportError):
    """A malformed frame; the link it came on has been closed."""


class BackupBehind(TransportError):
    """The memory node failed and its backup missed acknowledged writes (its
    replication had failed): failing over would have returned old pages."""


class RemoteError(HarnessError):
    """A node answered a request with an error that is not raised here as its
    own class (harness.remote_errors): remote_type names that class."""

    def __init__(self, message: str, remote_type: str | None = None,
                 errno: int | None = None) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.errno = errno


class DBOSError(HarnessError):
    """A DBOS request failed; nothing it would have changed was changed."""


class FSError(DBOSError, OSError):
    """A file-system error with a POSIX errno (ENOENT, EEXIST, ENOTDIR, ...)."""

    def __init__(self, err: int, path: str) -> None:
        import os

        OSError.__init__(self, err, os.strerror(err), path)


class ClusterError(HarnessError):
    """A cluster could not be started, found or reached."""


class ImageError(HarnessError):
    """A guest kernel or initramfs could not be built or is unusable."""


class LaunchError(HarnessError):
    """QEMU failed to start or died; carries its command line and console."""

    def __init__(self, message: str, cmdline: list[str] | None = None,
                 exit_code: int | None = None, console: str = "") -> None:
        super().__init__(message)
        self.cmdline = cmdline or []
        self.exit_code = exit_code
        self.console = console


class BootTimeout(HarnessError):
    """A guest did not report READY in time; carries the last console lines."""

    def __init__(self, message: str, console: str = "") -> None:
        super().__init__(message)
        self.console = console


class IsolationFault(HarnessError):
    """An access crossed a compartment boundary outside a gate."""
