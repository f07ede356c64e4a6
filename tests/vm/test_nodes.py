"""Node agents in guests: each role boots, answers over its virtio-serial
control link, runs commands, and leaves nothing behind."""

import pytest

from harness import topology
from harness._native.transport import Op
from harness.nodes.cluster import open_cluster

from ..unit.helpers import alive


def one_node(role: str) -> topology.Topology:
    node = {"name": f"{role}0", "role": role}
    if role == "snode":
        node["disk"] = "64MiB"
    return topology.parse({"name": f"one-{role}", "placement": "vm", "nodes": [node]}, "<test>")


@pytest.mark.parametrize("role", topology.ROLES)
def test_each_role_boots_and_answers_ping(role):
    with open_cluster(one_node(role), timeout=120) as c:
        [row] = c.status()
        assert (row["role"], row["state"], row["placement"]) == (role, "ready", "vm")
        assert row["accel"] in ("kvm", "tcg")
        assert c.call(f"{role}0", Op.PING) == b""
        r = c.exec(f"{role}0", ["sh", "-c", "mount | grep -c ' /run/dh/disk '"])
        assert r.stdout.strip() == (b"1" if role == "snode" else b"0")
        pid = row["pid"]
    assert not alive(pid)
