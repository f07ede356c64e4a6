"""Nodes placed with libvirt: the topology's host key, the domain libvirt
gets (the launcher's machine: kernel, command line, root export, ports,
ivshmem slots, disk), and a URI that does not answer failing within its
timeout with the host and URI named. No domain starts here; tests/vm does
that."""

import re
import socket
import xml.etree.ElementTree as ET

import pytest

from harness import topology
from harness.errors import ClusterError, NotSupported, TopologyError
from harness.vm import domain
from harness.vm.qemu import IVSHMEM_SLOT, kernel_params

from .test_qemu_cmd import cfg

NODES = [{"name": "pnode0", "role": "pnode"}, {"name": "mnode0", "role": "mnode"}]


def test_host_defaults_to_the_local_daemon_and_is_per_node():
    t = topology.parse({"name": "t", "placement": "libvirt", "nodes": [
        NODES[0], {**NODES[1], "host": "qemu+ssh://me@hostb/system"}]}, "<t>")
    assert [(n.placement, n.host, n.in_vm) for n in t.nodes] == [
        ("libvirt", "qemu:///system", True), ("libvirt", "qemu+ssh://me@hostb/system", True)]
    moved = topology.load("lego3").with_placement("libvirt")
    assert {n.host for n in moved.nodes} == {"qemu:///system"}
    assert {n.host for n in moved.with_placement("vm").nodes} == {""}


@pytest.mark.parametrize("data, key", [
    ({"placement": "libvirt", "host": "ssh://hostb"}, "host"),
    ({"placement": "vm", "nodes": [{**NODES[0], "host": "qemu:///system"}]}, "nodes[0].host"),
])
def test_bad_hosts_are_named(data, key):
    with pytest.raises(TopologyError, match=rf"<t>: {re.escape(key)}: expected"):
        topology.parse({"name": "t", "nodes": NODES, **data}, "<t>")


def test_domain_is_the_launchers_machine(tmp_path):
    shm = tmp_path / "a.shm"
    shm.write_bytes(b"\0" * 65536)
    c = cfg(ports=["dh.ctl"], shm=[shm, shm], disk=tmp_path / "d.ext4",
            streams=[("dh.s.x", "socket,path=/r/x.sock,server=on,wait=off")])
    x = ET.fromstring(domain.domain_xml(c, "dh-run-t"))
    assert x.get("type") == "qemu" and x.findtext("name") == "dh-run-t"
    assert x.find("cpu").get("mode") == "maximum"  # -cpu max: protection keys under TCG
    assert x.findtext("os/kernel") == "/k/vmlinux"
    assert x.findtext("os/cmdline") == kernel_params(c)
    fs = x.find("devices/filesystem")
    assert fs.find("source").get("dir") == "/" and fs.find("readonly") is not None
    chans = {ch.find("target").get("name"): ch for ch in x.findall("devices/channel")}
    assert chans["dh.ctl"].find("source").attrib == {"mode": "connect",
                                                     "path": "/run/x/t.dh.ctl.sock"}
    assert chans["dh.s.x"].find("source").get("mode") == "bind"
    slots = [(s.get("name"), int(s.find("address").get("slot")))
             for s in x.findall("devices/shmem")]
    assert slots == [("dh-run-t.shm0", IVSHMEM_SLOT), ("dh-run-t.shm1", IVSHMEM_SLOT + 1)]
    assert x.find("devices/disk/source").get("file") == str(tmp_path / "d.ext4")
    assert x.find("seclabel/label").text.startswith("+")  # runs as us: our files are private
    assert x.findtext("on_poweroff") == "destroy"


def test_what_a_domain_cannot_do_is_refused():
    with pytest.raises(NotSupported, match="-icount"):
        domain.domain_xml(cfg(deterministic=True), "d")


def test_a_uri_that_does_not_answer_fails_naming_host_and_uri():
    """A host that takes the connection but never answers (a hung daemon,
    a firewall that swallows the traffic): our timeout, not TCP's."""
    with socket.create_server(("127.0.0.1", 0), backlog=4) as silent:
        uri = f"qemu+tcp://127.0.0.1:{silent.getsockname()[1]}/system"
        with pytest.raises(ClusterError, match=rf"libvirt at {re.escape(uri)} \(host "
                           r"127.0.0.1:\d+\) did not answer within 1 s"):
            domain.connect(uri, timeout=1.0)


def test_a_refused_uri_names_host_and_uri():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again: nothing listens there
    uri = f"qemu+tcp://127.0.0.1:{port}/system"
    with pytest.raises(ClusterError, match=rf"cannot connect to libvirt at {re.escape(uri)} "
                       rf"\(host 127.0.0.1:{port}\): .*refused.*check that libvirtd runs "
                       rf"on 127.0.0.1:{port}"):
        domain.connect(uri, timeout=10.0)
