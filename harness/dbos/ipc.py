"""IPC as SQL: send inserts a row; receive selects and deletes the oldest
message for the receiver in one transaction, so a message is delivered
exactly once while the store runs.

A send returns once its message is on disk. A receive's commit does not
wait for the disk (the next durable commit carries it): a crash can undo
the receives of its last moments, and those messages are delivered again,
at least once; no sent message is lost. This halves the fsyncs of a round
trip (two, not four)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.dbos.store import Store


class IPC:
    def __init__(self, db: Store) -> None:
        self.db = db

    def send(self, sender: str, receiver: str, data: bytes, task: int | None = None) -> int:
        with self.db.tx() as con:
            mid = con.execute("INSERT INTO messages (receiver_id, sender_id, data, sent) "
                              "VALUES (?, ?, ?, ?) RETURNING message_id",
                              (receiver, sender, bytes(data), time.time())).fetchone()[0]
            if task is not None:
                self.db.log(con, "msg_send", f"msg:{mid}", task)
            self.db.changed.notify_all()
        return mid

    def _take(self, receiver: str, task: int | None) -> dict | None:
        with self.db.tx(durable=False) as con:
            row = con.execute("DELETE FROM messages WHERE message_id = (SELECT message_id "
                              "FROM messages WHERE receiver_id = ? ORDER BY message_id LIMIT 1) "
                              "RETURNING message_id, sender_id, data", (receiver,)).fetchone()
            if row is not None and task is not None:
                self.db.log(con, "msg_recv", f"msg:{row[0]}", task)
        if row is None:
            return None
        return {"message_id": row[0], "sender": row[1], "data": bytes(row[2])}

    def recv(self, receiver: str, timeout: float = 0.0, task: int | None = None) -> dict | None:
        """The oldest message for receiver, waiting up to timeout seconds;
        None if none came."""
        deadline = time.monotonic() + timeout
        with self.db.lock:
            while True:
                msg = self._take(receiver, task)
                left = deadline - time.monotonic()
                if msg is not None or left <= 0:
                    return msg
                self.db.changed.wait(min(left, 0.5))
