"""Topology files: the built-in one loads; every mistake names file and key."""

import pytest

from harness import topology
from harness.errors import TopologyError

GOOD = """
name = "t1"
[[nodes]]
name = "p"
role = "pnode"
[[nodes]]
name = "m"
role = "mnode"
memory = "2GiB"
[[links]]
between = ["p", "m"]
model = "rdma"
"""


def write(tmp_path, text, name="t.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_lego3_is_built_in():
    t = topology.load("lego3")
    assert [n.name for n in t.nodes] == ["pnode0", "mnode0", "snode0"]
    assert [n.role for n in t.nodes] == ["pnode", "mnode", "snode"]
    assert {(k.client, k.server) for k in t.links} == {("pnode0", "mnode0"),
                                                       ("pnode0", "snode0")}
    assert all(n.placement == "process" for n in t.nodes)


def test_good_file_and_rdma_model(tmp_path):
    t = topology.load(write(tmp_path, GOOD))
    assert t.node("m").memory == 2 << 30 and t.node("p").nid == 1
    m = t.links[0].model
    # LegoOS: 4.6 us for 128 B and 6.5 us for 4 KB round trips
    rtt = lambda size: 2 * m.latency_ns + size / m.bytes_per_sec * 1e9  # noqa: E731
    assert rtt(128) == pytest.approx(4600, rel=0.01)
    assert rtt(4096) == pytest.approx(6500, rel=0.01)


def test_with_placement(tmp_path):
    t = topology.load(write(tmp_path, GOOD)).with_placement("vm")
    assert {n.placement for n in t.nodes} == {"vm"}
    with pytest.raises(TopologyError, match="placement"):
        t.with_placement("cloud")


@pytest.mark.parametrize("edit,key,expect", [
    (('role = "pnode"', 'role = "gpu"'), "nodes[0].role", "one of"),
    (('memory = "2GiB"', 'memory = "lots"'), "nodes[1].memory", "a size"),
    (('name = "m"', 'name = "p"'), "nodes[1].name", "no other node"),
    (('between = ["p", "m"]', 'between = ["p", "x"]'), "links[0].between", "two different"),
    (('model = "rdma"', 'model = "carrier-pigeon"'), "links[0].model", "one of"),
    (('model = "rdma"', 'model = {latency_us = -1}'), "links[0].model.latency_us", ">= 0"),
    (('model = "rdma"', 'size = "3MiB"'), "links[0].size", "power of two"),
    (('model = "rdma"', 'kind = "carrier"'), "links[0].kind", "one of"),
    (('memory = "2GiB"', 'colour = "red"'), "nodes[1].colour", "one of the keys"),
    (('name = "t1"', 'name = "T 1"'), "name", "lower-case"),
])
def test_errors_name_file_key_and_expectation(tmp_path, edit, key, expect):
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(TopologyError) as e:
        topology.load(path)
    msg = str(e.value)
    assert str(path) in msg and f"{key}:" in msg and expect in msg


def test_missing_required_key(tmp_path):
    with pytest.raises(TopologyError, match=r"nodes\[0\].role: expected a value"):
        topology.load(write(tmp_path, 'name = "x"\n[[nodes]]\nname = "a"\n'))


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(TopologyError, match="not valid TOML"):
        topology.load(write(tmp_path, "name = \n"))
    with pytest.raises(TopologyError, match="cannot read"):
        topology.load(tmp_path / "absent.toml")
    with pytest.raises(TopologyError, match="built-in ones are"):
        topology.load("no-such-topology")


@pytest.mark.parametrize("text,value", [("4096", 4096), ("16MiB", 16 << 20), ("1GB", 10**9),
                                        (4096, 4096), ("2 KiB", 2048)])
def test_parse_size(text, value):
    assert topology.parse_size(text) == value


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError, match="expected a size"):
        topology.parse_size("12 parsecs")
