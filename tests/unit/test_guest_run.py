"""Running a command in a guest: its JSON back, or an error naming what
failed with its status and the end of its stderr."""

import sys
from types import SimpleNamespace

import pytest

from harness import guest_run
from harness.errors import HarnessError
from harness.text import table, tail


class FakeCluster:
    def __init__(self, returncode: int, stdout: bytes, stderr: bytes = b"") -> None:
        self.result = SimpleNamespace(returncode=returncode, stdout=stdout, stderr=stderr)
        self.calls: list = []

    def exec(self, node, argv, timeout):
        self.calls.append((node, list(argv), timeout))
        return self.result


def test_json_from_a_cluster_node():
    c = FakeCluster(0, b'{"rows": [1, 2]}\n')
    assert guest_run.guest_json(["prog"], "the thing", cluster=c, node="pnode1",
                                timeout=5) == {"rows": [1, 2]}
    assert c.calls == [("pnode1", ["prog"], 5)]


def test_a_failure_names_what_where_its_status_and_stderr_tail():
    c = FakeCluster(3, b"", b"x" * 5000 + b"Traceback: boom\n")
    with pytest.raises(HarnessError) as ei:
        guest_run.guest_json(["prog"], "the thing", cluster=c)
    msg = str(ei.value)
    assert msg.startswith("the thing failed on pnode0 (status 3):\n")
    assert msg.endswith("Traceback: boom") and len(msg) < 2100


def test_without_a_cluster_it_boots_a_guest(monkeypatch):
    seen = {}

    def fake_boot(argv, timeout, stdout, stderr, **options):
        seen.update(argv=argv, timeout=timeout, **options)
        stdout.write(b'{"ok": true}')
        stderr.write(b"a warning")
        return 0

    monkeypatch.setattr("harness.vm.boot.boot", fake_boot)
    assert guest_run.guest_json([sys.executable], "x", role="snode") == {"ok": True}
    assert seen == {"argv": [sys.executable], "timeout": 900.0, "role": "snode"}

    monkeypatch.setattr("harness.vm.boot.boot",
                        lambda argv, timeout, stdout, stderr, **o: stderr.write(b"bad") and 1)
    with pytest.raises(HarnessError, match=r"^x failed in the snode guest \(status 1\):\nbad$"):
        guest_run.run_in_guest(["false"], "x", role="snode")


def test_table_aligns_columns_under_a_rule():
    assert table(["a", "bb"], [["xxx", "1"], ["y", "22"]], align="lr").splitlines() == [
        "a    bb", "---  --", "xxx   1", "y    22"]
    assert table(None, [["total", "1.00 s"], ["boot", "12.50 s"]], align="lr") == \
        "total   1.00 s\nboot   12.50 s"


def test_tail():
    assert tail(None) == "-" and tail(b"  \n") == "-"
    assert tail(b"abcdef\n", 4) == "def"
