"""Bounded-time fuzzing of the frame decoder, in memory and on a live link:
garbage must give a ProtocolError (or an incomplete frame), never a crash,
a hang or a frame that was not sent. And of the topology parser: any
document or file gives a Topology or a TopologyError naming it."""

import os
import random
import socket
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from harness import topology
from harness._native import transport as t
from harness.errors import LinkClosed, ProtocolError, TopologyError

BUDGET_S = float(os.environ.get("HARNESS_FUZZ_SECONDS", "3"))


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_on_random_bytes(data):
    try:
        r = t.decode_frame(data)
    except ProtocolError:
        return
    if r is not None:  # only a real frame decodes; re-encoding gives it back
        hdr, payload, used = r
        assert data[:used] == t.encode_frame(hdr.opcode, payload, src=hdr.src,
                                              flags=hdr.flags, req_id=hdr.req_id)


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.6 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif choice < 0.8:
            del b[rng.randrange(len(b) + 1):]
        else:
            b[rng.randrange(len(b) + 1):0] = rng.randbytes(rng.randint(1, 16))
    return bytes(b)


def test_mutated_frames_for_a_bounded_time():
    rng = random.Random(1234)
    seeds = [t.encode_frame(op, rng.randbytes(rng.randint(0, 600)), req_id=rng.getrandbits(64))
             for op in t.Op]
    deadline, n, rejected = time.monotonic() + BUDGET_S, 0, 0
    while time.monotonic() < deadline:
        data = _mutate(rng, rng.choice(seeds))
        try:
            r = t.decode_frame(data)
        except ProtocolError:
            rejected += 1
        else:
            if r is not None:
                hdr, payload, used = r
                assert data[:used] == t.encode_frame(hdr.opcode, payload, src=hdr.src,
                                                      flags=hdr.flags, req_id=hdr.req_id)
        n += 1
    assert n > 1000 and rejected > n // 2


def test_garbage_on_a_stream_link_closes_it_without_hanging():
    rng = random.Random(99)
    deadline, n = time.monotonic() + BUDGET_S / 2, 0
    while time.monotonic() < deadline:
        data = _mutate(rng, t.encode_frame(t.Op.ECHO, rng.randbytes(64)))
        a, b = socket.socketpair()
        with a, b:
            rx = t.Link.from_fd(b.fileno())
            a.sendall(data)
            a.shutdown(socket.SHUT_WR)  # EOF: a cut frame must not look like a slow one
            try:
                hdr, payload = rx.recv(timeout=2.0)
            except ProtocolError:
                assert rx.closed
            except LinkClosed:
                assert data == b""
            else:
                assert data.startswith(t.encode_frame(hdr.opcode, payload, flags=hdr.flags,
                                                      req_id=hdr.req_id, src=hdr.src))
        n += 1
    assert n > 50


# ---- the topology parser ---------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                     st.floats(allow_nan=True), st.text(max_size=12),
                     st.sampled_from(["pnode0", "mnode0", "snode0", "pnode", "mnode", "snode",
                                      "vm", "process", "shm", "tcp", "rdma", "4MiB", "1GiB",
                                      "64KiB", "0", "-1MiB"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["name", "role", "between", "kind", "size", "model",
                                     "memory", "disk", "cpus", "placement", "latency_us",
                                     "bandwidth_gbps", "x"]), inner, max_size=5)), max_leaves=12)
_docs = st.dictionaries(st.sampled_from(["name", "description", "placement", "nodes", "links",
                                         "extra"]), _values, max_size=6)


def _lego3() -> dict:
    return topology.read_toml(topology.BUILTIN_DIR / "lego3.toml")


@settings(max_examples=1500, deadline=None)
@given(_docs)
def test_topology_parser_on_random_documents(doc):
    """Any document: a Topology, or a TopologyError; nothing else."""
    try:
        topology.parse(doc, "<fuzz>")
    except TopologyError:
        pass


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(["nodes", "links"]), st.integers(0, 2),
       st.sampled_from(["name", "role", "between", "kind", "size", "model", "memory", "disk",
                        "cpus", "placement"]), _values)
def test_topology_parser_on_lego3_with_one_field_changed(section, index, key, value):
    doc = _lego3()
    items = doc[section]
    items[index % len(items)][key] = value
    try:
        t = topology.parse(doc, "<fuzz>")
    except TopologyError as exc:
        assert str(exc).startswith("<fuzz>")  # names the file, then the key
        return
    assert {n.name for n in t.nodes} >= {k.client for k in t.links}


def test_mutated_topology_files_for_a_bounded_time(tmp_path):
    rng = random.Random(99)
    seed = (topology.BUILTIN_DIR / "lego3.toml").read_bytes()
    path = tmp_path / "t.toml"
    deadline, n, rejected = time.monotonic() + BUDGET_S, 0, 0
    while time.monotonic() < deadline:
        path.write_bytes(_mutate(rng, seed))
        try:
            topology.load(path)
        except TopologyError:
            rejected += 1
        n += 1
    assert n > 100 and 0 < rejected <= n
