"""DBOS: OS state and services as SQL tables over SQLite (DBOS, VLDB'22).

The same API runs embedded on a local file (`DBOS.open(path)`) or on the
running cluster's snode over the transport (`Cluster.dbos`)."""

from harness.dbos.db import DBOS
from harness.dbos.store import Result
from harness.errors import DBOSError, FSError

__all__ = ["DBOS", "DBOSError", "FSError", "Result"]
