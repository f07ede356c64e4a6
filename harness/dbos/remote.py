"""DBOS over the transport: a request names a service, a function and its
arguments (JSON; bytes travel as {"$b": base64}); the snode answers with
the value, or with the error's envelope (harness.remote_errors), so an
FSError arrives as an FSError with its errno. Only the functions listed
here can be called."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from harness.dbos.store import Result
from harness.errors import DBOSError

if TYPE_CHECKING:
    from harness.dbos.db import DBOS

EXPOSED: dict[str, set[str]] = {
    "": {"sql"},
    "sched": {"add_worker", "submit", "claim", "claim_many", "complete"},
    "ipc": {"send", "recv"},
    "fs": {"mkdir", "create", "open", "write", "read", "truncate", "stat", "listdir",
           "unlink", "rmdir", "rename", "largest"},
    "vfs": {"lookup", "getattr", "readlink", "readdir", "statfs", "create", "symlink", "mkdir",
            "unlink", "rmdir", "rename", "forget", "purge_orphans", "setattr", "read", "write",
            "log", "sync"},
    "prov": {"readers_of_writes", "programs_reading_writes_of", "events"},
    "state": {"report_node", "report_nodes", "report_region", "report_pages"},
}


def _enc(v: Any) -> Any:
    if isinstance(v, bytes | bytearray | memoryview):
        return {"$b": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, Result):
        return {"$result": v.to_dict()}
    if isinstance(v, list | tuple):
        return [_enc(x) for x in v]
    if isinstance(v, dict):
        return {k: _enc(x) for k, x in v.items()}
    return v


def _dec(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"$b"}:
            return base64.b64decode(v["$b"])
        if set(v) == {"$result"}:
            return Result(**v["$result"])
        return {k: _dec(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_dec(x) for x in v]
    return v


def serve(db: DBOS, payload: bytes) -> bytes:
    """The snode's side: runs one request and encodes its value. An error is
    raised, for the agent to answer with its envelope."""
    try:
        req = json.loads(payload)
        svc, fn = req.get("svc", ""), req["fn"]
        if fn not in EXPOSED.get(svc, set()):
            raise DBOSError(f"no DBOS function {svc + '.' if svc else ''}{fn}")
        target = getattr(db, svc) if svc else db
        value = getattr(target, fn)(*_dec(req.get("args", [])), **_dec(req.get("kwargs", {})))
        return json.dumps(_enc(value)).encode()
    except (TypeError, KeyError, ValueError) as exc:  # a malformed request, bad arguments
        raise DBOSError(str(exc)) from exc


class _Service:
    def __init__(self, call: Callable[[bytes], bytes], svc: str) -> None:
        self._call, self._svc = call, svc

    def __getattr__(self, fn: str) -> Callable[..., Any]:
        if fn not in EXPOSED.get(self._svc, set()):
            raise AttributeError(fn)

        def remote(*args: Any, **kwargs: Any) -> Any:
            req = {"svc": self._svc, "fn": fn, "args": _enc(list(args)), "kwargs": _enc(kwargs)}
            return _dec(json.loads(self._call(json.dumps(req).encode())))

        return remote


class RemoteDBOS:
    """The DBOS API of a snode, reached through `call` (one RPC that raises an
    error the snode answered as its own class: harness.remote_errors.call)."""

    def __init__(self, call: Callable[[bytes], bytes]) -> None:
        self._root = _Service(call, "")
        self.sched, self.ipc, self.fs = (_Service(call, s) for s in ("sched", "ipc", "fs"))
        self.prov, self.state = _Service(call, "prov"), _Service(call, "state")
        self.vfs = _Service(call, "vfs")

    def sql(self, query: str, params: list | tuple = (), write: bool = False) -> Result:
        return self._root.sql(query, list(params), write=write)
