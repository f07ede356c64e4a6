"""The links between a cluster's nodes, made before the nodes start: shm
channel files (ivshmem devices between VMs, with a pnode guest's memory
channels to its mnode), virtio-serial streams between VMs, and socket pairs
between host processes (TCP connections across the network between
processes in different network namespaces, see netns.py)."""

from __future__ import annotations

import socket
from pathlib import Path

from harness._native.transport import create_shm_file
from harness.nodes import netns
from harness.nodes.spec import LinkEnd
from harness.topology import Topology
from harness.vm.domain import host_address
from harness.vm.streams import chardevs, facing, port_name


def link_ends(topology: Topology, shm_dir: Path, run_dir: Path, memory_channels: int
              ) -> tuple[dict[str, list[LinkEnd]], list[int]]:
    """Creates every inter-node link; returns each node's ends and the fds
    the controller must close once the agents have inherited them."""
    ends: dict[str, list[LinkEnd]] = {n.name: [] for n in topology.nodes}
    fds: list[int] = []
    role = {n.name: n.role for n in topology.nodes}
    in_vm = {n.name: n.in_vm for n in topology.nodes}
    nets = {n.name: n.netns for n in topology.nodes}
    hosts = {n.name: host_address(n.host) for n in topology.nodes}
    for k in topology.links:
        model = {"latency_ns": k.model.latency_ns, "bytes_per_sec": k.model.bytes_per_sec}
        auth = {"auth": True} if k.kind == "tcp" else {}  # the kind that can cross hosts
        cl = {**model, "peer_role": role[k.server], **auth}
        sv = {**model, "peer_role": role[k.client], **auth}
        if k.kind == "shm":
            # Between VMs the same file backs an ivshmem device in each guest.
            attach = "ivshmem" if in_vm[k.client] else "shm"
            channels = [("", k.name)]
            if attach == "ivshmem" and {role[k.client], role[k.server]} == {"pnode", "mnode"}:
                channels += [("excache", f"{k.name}.excache{i or ''}")  # for workloads
                             for i in range(memory_channels)]
            for service, fname in channels:
                path = str(shm_dir / f"{fname}.shm")
                create_shm_file(path, k.size)
                ends[k.client].append(LinkEnd(k.server, attach, False, path=path, side=0,
                                              service=service, **cl))
                ends[k.server].append(LinkEnd(k.client, attach, True, path=path, side=1,
                                              service=service, **sv))
            continue
        if in_vm[k.client]:  # both are (the constructor checked)
            server, client = chardevs(k.kind, k.name, run_dir,
                                      _server_at(hosts[k.server], hosts[k.client]))
            dev = f"/dev/virtio-ports/{port_name(k.name)}"
            ends[k.client].append(LinkEnd(k.server, "dev", False, path=dev, chardev=client,
                                          **cl))
            ends[k.server].append(LinkEnd(k.client, "dev", True, path=dev, chardev=server,
                                          **sv))
            continue
        a, b = (netns.tcp_pair(nets[k.client], nets[k.server]) if k.kind == "tcp"
                else socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM))
        fds += [a.detach(), b.detach()]
        ends[k.client].append(LinkEnd(k.server, "fd", False, fd=fds[-2], **cl))
        ends[k.server].append(LinkEnd(k.client, "fd", True, fd=fds[-1], **sv))
    return ends, fds


def _server_at(server: str | None, client: str | None) -> str:
    """Where a TCP stream's server listens (None: this machine): its own
    host's address, or this machine's towards the client's host."""
    if server is not None:
        return server
    return facing(client) if client is not None else "127.0.0.1"
