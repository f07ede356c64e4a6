"""Errors that cross a link, one convention for all of them (as drgn keeps one
two-way mapping between its errors and Python's): the node that failed
answers with an envelope naming the exception's class, its message and its
errno, and the caller raises that class again, errno and all. A class this
module does not know comes back as a RemoteError naming the remote type.

Known: the classes of harness.errors, except the transport errors. Those
describe the far node's own links; raised again on the caller's side they
would read as the caller's link failing, which callers take to mean the node
is gone (they retry, mark it down, fail over). They too arrive as a
RemoteError, whose remote_type and errno say what happened."""

from __future__ import annotations

import json

from harness import errors
from harness.errors import FSError, HarnessError, RemoteError, TransportError

KNOWN: dict[str, type[HarnessError]] = {
    c.__name__: c for c in vars(errors).values()
    if isinstance(c, type) and issubclass(c, HarnessError) and not issubclass(c, TransportError)
}

_CUT = " [... error message cut at the link's limit]"
_START = '{"$error": '  # how json.dumps begins every envelope


def encode(exc: BaseException, limit: int | None = None) -> bytes:
    """The envelope for exc, in at most `limit` bytes (a message that long is
    shortened, saying so)."""
    err = getattr(exc, "errno", None)
    env = {"type": type(exc).__name__, "message": str(exc),
           "errno": err if isinstance(err, int) else None,  # JSON, whatever exc holds
           "path": exc.filename if isinstance(exc, FSError) else None}
    out = json.dumps({"$error": env}).encode()
    if limit is not None and len(out) > limit:
        # Each character cut takes at least its one byte out of the JSON.
        keep = max(len(env["message"]) - (len(out) - limit) - len(_CUT), 0)
        env["message"] = env["message"][:keep] + _CUT
        out = json.dumps({"$error": env}).encode()
    return out


def decode(payload: bytes | str, where: str) -> HarnessError | None:
    """The exception an envelope stands for (None if payload is not one);
    `where` (the link) names an unknown type's origin."""
    try:
        env = json.loads(payload)["$error"]
        kind, message, err = env["type"], env["message"], env.get("errno")
    except (ValueError, TypeError, KeyError):
        return None
    cls = KNOWN.get(kind)
    if cls is None:
        return RemoteError(f"{where}: {kind}: {message}", remote_type=kind, errno=err)
    if cls is FSError:  # its message is made from errno and path
        return cls(err, env.get("path"))
    exc = cls(message)
    if err is not None:
        exc.errno = err
    return exc


def call(link, opcode: int, payload: bytes = b"", timeout: float = 5.0) -> bytes:
    """link.call, raising an error the peer answered as its own class."""
    try:
        return link.call(opcode, payload, timeout=timeout)
    except RemoteError as exc:
        # Link.call raises RemoteError(f"{the link's name}: {the reply}").
        where, envelope, rest = str(exc).partition(": " + _START)
        sent = decode(_START + rest, where) if envelope else None
        if sent is None:  # not an envelope: a peer that answers in plain text
            raise
        raise sent from None
