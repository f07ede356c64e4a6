"""A hostile peer on a shared-memory channel: another process maps the
same file and rewrites a live ring's header and indices. The harness's
ends (in a child process, so a crash shows as a signal, not a lost run)
must keep their own indices, check the peer's, and close the link with an
error, never read or write outside the rings.

File layout (shm.c): header at 0; ring 0's head at 4096 and tail at 4160,
ring 1's at 4352 and 4416; ring 0's data at S/2, ring 1's at 3S/4, each
S/4 bytes (ring 1 ends at the end of the file)."""

import json
import struct
import subprocess
import sys
import textwrap

import pytest

from harness._native import transport as t
from harness.errors import ProtocolError

SIZE = 64 << 10
CAP = SIZE // 4
OFF = {"file_bytes": 8, "ring_bytes": 12, "generation": 32,
       "head0": 4096, "tail0": 4160, "head1": 4352, "tail1": 4416}

# One process holds both ends, as a controller and a node would; side 0
# sends on ring 0 and receives on ring 1.
VICTIM = textwrap.dedent("""
    import json, sys
    from harness._native import transport as t
    from harness.errors import TransportTimeout
    path, op = sys.argv[1], sys.argv[2]
    a, b = t.Link.shm_open(path, 0), t.Link.shm_open(path, 1)
    for i in range(40):  # a live ring: both ways, wrapped, indices far from 0
        a.send(t.Op.ECHO, bytes(i * 37 % 3000), req_id=i)
        b.recv(timeout=1)
        b.send(t.Op.ECHO, bytes(i * 41 % 3000), req_id=i)
        a.recv(timeout=1)
    if op == "send_full":
        try:
            while True:
                a.send(t.Op.ECHO, bytes(1000), timeout=0.02)
        except TransportTimeout:
            pass
    print("ready", flush=True)
    sys.stdin.readline()  # the hostile writer has had its go

    def run():
        if op == "recv_on_0":  # ring 1: b sends, a receives
            b.send(t.Op.ECHO, b"after", req_id=99)
            return a.recv(timeout=1)[1] == b"after", a
        if op == "recv_on_1":  # ring 0: a sends, b receives
            a.send(t.Op.ECHO, b"after", req_id=99)
            return b.recv(timeout=1)[1] == b"after", b
        if op == "recv_empty":
            return b.recv(timeout=0.5), b
        if op == "send_full":
            return a.send(t.Op.ECHO, bytes(1000), timeout=0.5), a
        if op == "reopen":
            return t.Link.shm_open(path, 1), b
        if op == "reset":
            return t.reset_shm_file(path), a
        raise SystemExit(f"unknown op {op}")

    try:
        value, end = run()
        out = {"outcome": "ok", "value": value is True}
    except Exception as exc:
        out = {"outcome": type(exc).__name__, "message": str(exc)}
        end = {"recv_on_0": a, "send_full": a, "reset": a}.get(op, b)
    out["closed"] = end.closed
    print(json.dumps(out), flush=True)
""")

HOSTILE = textwrap.dedent("""
    import mmap, os, struct, sys
    off, writes = eval(sys.argv[1]), eval(sys.argv[2])
    fd = os.open(sys.argv[3], os.O_RDWR)
    m = mmap.mmap(fd, 0)
    now = {k: struct.unpack_from("<I", m, o)[0] for k, o in off.items()}
    now["cap"] = len(m) // 4
    for field, expr in writes:
        struct.pack_into("<I", m, off[field], eval(expr, {}, now) & 0xFFFFFFFF)
""")


def attack(tmp_path, op: str, writes: list[tuple[str, str]]) -> dict:
    """Runs the victim up to a live ring, lets a hostile process rewrite
    fields of the file (expressions of their current values), then runs op."""
    path = str(tmp_path / "ring.shm")
    t.create_shm_file(path, SIZE)
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, path, op], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert victim.stdout.readline() == b"ready\n", victim.stderr.read().decode()
        subprocess.run([sys.executable, "-c", HOSTILE, repr(OFF), repr(writes), path],
                       check=True, timeout=30)
        out, err = victim.communicate(b"go\n", timeout=30)
    finally:
        victim.kill()
    assert victim.returncode == 0, f"victim died with status {victim.returncode}: {err.decode()}"
    return json.loads(out)


@pytest.mark.parametrize(("op", "field"), [
    ("recv_on_0", "tail1"),  # the receiver's own index, at the end of the file
    ("recv_on_0", "head1"),  # the sender's own index
    ("recv_on_1", "tail0"),
    ("recv_on_1", "head0"),
])
def test_an_end_keeps_its_own_index(tmp_path, op, field):
    """An unaligned index 2 bytes before the ring's end would put the length
    word past the ring (past the file for ring 1): an end never reloads its
    own index, so the frame still arrives whole."""
    out = attack(tmp_path, op, [(field, "cap - 2")])
    assert out == {"outcome": "ok", "value": True, "closed": False}, out


@pytest.mark.parametrize("expr", [
    "head0 + 3",              # unaligned
    "tail0 - 8",              # the consumer went backwards
    "head0 + 8",              # consumed more than was produced
    "head0 - cap - 8",        # further behind than the ring holds
])
def test_a_bad_consumer_index_closes_the_senders_link(tmp_path, expr):
    """The sender re-reads the peer's tail when its ring is full."""
    out = attack(tmp_path, "send_full", [("tail0", expr)])
    assert out["outcome"] == "ProtocolError" and out["closed"], out


@pytest.mark.parametrize("expr", ["tail0 + 3", "tail0 + cap + 8", "tail0 - cap - 8"])
def test_a_bad_producer_index_closes_the_receivers_link(tmp_path, expr):
    out = attack(tmp_path, "recv_empty", [("head0", expr)])
    assert out["outcome"] == "ProtocolError" and out["closed"], out


def test_a_rewritten_generation_closes_live_ends(tmp_path):
    out = attack(tmp_path, "recv_on_1", [("generation", "generation + 5")])
    assert out["outcome"] == "LinkClosed", out


@pytest.mark.parametrize("writes", [
    [("ring_bytes", "0x40000000")],       # a ring far outside the file
    [("ring_bytes", "cap - 4")],
    [("file_bytes", "0"), ("ring_bytes", "0")],
    [("file_bytes", "cap"), ("ring_bytes", "cap // 4")],  # smaller than the file
    [("file_bytes", "0x80000000"), ("ring_bytes", "0x20000000")],
])
@pytest.mark.parametrize("op", ["reset", "reopen"])
def test_a_rewritten_header_is_refused_by_reset_and_open(tmp_path, writes, op):
    """dh_shm_file_reset writes at offsets from the header: a header the
    peer rewrote is refused (ProtocolError), as opening such a file is."""
    out = attack(tmp_path, op, writes)
    assert out["outcome"] == "ProtocolError", out


def test_reset_of_a_sound_file_still_works(tmp_path):
    out = attack(tmp_path, "reset", [])
    assert out["outcome"] == "ok", out


def test_a_header_that_lies_about_ring_bytes_is_refused_in_process(tmp_path):
    path = tmp_path / "c.shm"
    t.create_shm_file(str(path), SIZE)
    with open(path, "r+b") as f:
        f.seek(OFF["ring_bytes"])
        f.write(struct.pack("<I", CAP // 2))
    with pytest.raises(ProtocolError):
        t.reset_shm_file(str(path))
