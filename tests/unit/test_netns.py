"""A second host on one machine: an mnode in a network namespace of its own,
reached over a veth pair. The pnode's link to it and this process's ExCache
channel are TCP connections across that network (the veth's counters see
every page), authenticated with the cluster's secret; the pages come back
intact; the mnode's death reaches the pnode as an error that names it."""

import os

import pytest

from harness import topology
from harness._native.transport import Op
from harness.errors import HarnessError, TopologyError
from harness.nodes import netns
from harness.nodes.cluster import open_cluster

PAGE = 4096
NODES = [{"name": "pnode0", "role": "pnode"},
         {"name": "mnode0", "role": "mnode", "netns": "hostb"}]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture
def hostb():
    name = f"dh-t{os.getpid()}"
    with netns.veth_host(name) as dev:
        yield name, dev


def counters(dev: str) -> int:
    return sum(int(open(f"/sys/class/net/{dev}/statistics/{d}_bytes").read())
               for d in ("tx", "rx"))


def test_a_pnode_pages_across_the_network_from_an_mnode_in_another_namespace(hostb):
    name, dev = hostb
    topo = topology.parse({"name": "split", "nodes": [NODES[0], {**NODES[1], "netns": name}],
                           "links": [{"between": ["pnode0", "mnode0"], "kind": "tcp"}]}, "<t>")
    with open_cluster(topo, cache="1MiB", fault_mode="thread") as c:
        assert set(c.nodes["pnode0"].peers) == {"mnode0"}  # the tcp link, authenticated
        before = counters(dev)
        region = c.alloc(8 << 20)
        m = memoryview(region)
        for off in range(0, len(m), PAGE):
            m[off:off + 8] = off.to_bytes(8, "little")
        bad = [off for off in range(0, len(m), PAGE)
               if int.from_bytes(m[off:off + 8], "little") != off]
        m.release()
        assert bad == []
        stats = c.memory.stats()
        assert stats["dirty_flushes"] > 0 and stats["remote_fetches"] > 0
        assert counters(dev) - before > 8 << 20  # every page went out and came back over it
        c.fault("mnode0", "kill")
        with pytest.raises(HarnessError, match="mnode0"):
            c.call("pnode0", Op.PING, b"peers", timeout=30.0)


@pytest.mark.parametrize("data, key", [
    ({"nodes": [NODES[0], NODES[1]], "links": [{"between": ["pnode0", "mnode0"]}]},
     "links[0].kind"),
    ({"nodes": [NODES[0], {**NODES[1], "placement": "vm"}]}, "nodes[1].netns"),
])
def test_what_cannot_cross_a_network_is_refused(data, key):
    with pytest.raises(TopologyError, match=rf"<t>: {key.replace('[', '.').replace(']', '.')}"):
        topology.parse({"name": "t", **data}, "<t>")


def test_a_missing_namespace_is_named():
    with pytest.raises(HarnessError, match=r"no network namespace 'dh-none'.*ip netns add"):
        netns.tcp_pair(None, "dh-none")


def test_bench_transport_across_the_veth_pair_beside_the_link_model():
    from harness.bench import transport

    rep = transport.run_veth(n=200)
    assert [(r.metric, r.floor) for r in rep.rows] == [
        (f"{m}_veth_{s}", f"{m}_model_{s}") for s in transport.SHAPES for m in transport.SIZES]
    assert all(r.n == 200 and r.p50 > 0 and r.floor_p50 > 0 for r in rep.rows)
    assert any("rdma: veth shaped by" in note for note in rep.notes)
    assert not [n for n in os.listdir("/run/netns") if n.startswith("dh-bench")]
