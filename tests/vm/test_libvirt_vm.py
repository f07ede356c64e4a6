"""Nodes as libvirt domains on qemu:///system (scripts/libvirtd.sh starts
the daemon): lego3 answers, pages and queries; faults go through libvirt;
the domains are named after the cluster and node and none is left defined
or running afterwards, even when the harness is SIGKILLed."""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from harness import topology
from harness._native.transport import Op
from harness.errors import ClusterError, HarnessError
from harness.nodes import netns
from harness.nodes.cluster import open_cluster
from harness.vm import domain

from ..unit.helpers import alive
from .test_excache_vm import WORKLOAD

HARNESS = [sys.executable, "-m", "harness.cli"]


def domains(prefix: str, uri: str = "qemu:///system") -> list[str]:
    """Every domain libvirt knows (running or defined) whose name starts so."""
    out = subprocess.run(["virsh", "-c", uri, "list", "--all", "--name"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return sorted(n for n in out.split() if n.startswith(prefix))


def gone(prefix: str, pids: list[int], within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while domains(prefix) or any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_lego3_on_libvirt_answers_and_faults_go_through_libvirt(tmp_path):
    prefix = f"dh-{tmp_path.name}-"
    with open_cluster(topology.load("lego3").with_placement("libvirt"), run_dir=tmp_path,
                      timeout=240) as c:
        assert domains(prefix) == [prefix + n for n in ("mnode0", "pnode0", "snode0")]
        state = c.status()
        assert [(n["name"], n["state"], n["placement"]) for n in state] == [
            ("pnode0", "ready", "libvirt"), ("mnode0", "ready", "libvirt"),
            ("snode0", "ready", "libvirt")]
        pids = [n["pid"] for n in state]
        assert all(alive(p) for p in pids)
        with open(f"/proc/{pids[0]}/cmdline") as f:  # libvirt's QEMU, our machine
            cmd = f.read().split("\0")
        assert "ivshmem-plain" in "".join(cmd) and "max" in cmd
        assert c.sql("SELECT count(*) FROM tasks") == [[0]]
        # A paused domain does not answer; resumed, it does.
        c.fault("snode0", "pause")
        with pytest.raises(HarnessError):
            c.call("snode0", Op.PING, timeout=1.0)
        c.fault("snode0", "resume")
        c.call("snode0", Op.PING, timeout=10.0)
        # The mnode's power cut: its domain is gone, and the pnode says which
        # peer stopped answering.
        c.fault("mnode0", "kill")
        assert domains(prefix) == [prefix + "pnode0", prefix + "snode0"]
        with pytest.raises(HarnessError, match="mnode0"):
            c.call("pnode0", Op.PING, b"peers", timeout=30.0)
        # Restarted through libvirt: a new domain of the same name, on the same links.
        c.fault("mnode0", "restart")
        assert domains(prefix) == [prefix + n for n in ("mnode0", "pnode0", "snode0")]
        assert "mnode0" in json.loads(c.call("pnode0", Op.PING, b"peers", timeout=30.0))
        pids = [n["pid"] for n in c.status()]
    assert gone(prefix, pids)


def test_a_program_on_the_libvirt_pnode_pages_over_ivshmem(tmp_path):
    env = {**os.environ, "HARNESS_RUN_DIR": str(tmp_path)}
    r = subprocess.run([*HARNESS, "run", "--placement", "libvirt", "--", sys.executable, "-c",
                        WORKLOAD], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["intact"] is True and s["misses"] > 0 and s["evictions"] > 0
    assert domains("dh-") == []


def test_sigkill_of_the_harness_leaves_no_domain(tmp_path):
    env = {**os.environ, "HARNESS_RUN_DIR": str(tmp_path)}
    up = subprocess.Popen([*HARNESS, "up", "--placement", "libvirt"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            r = subprocess.run([*HARNESS, "status", "--json"], capture_output=True, text=True,
                               timeout=60, env=env)
            if r.returncode == 0:
                break
            assert up.poll() is None and time.monotonic() < deadline, up.stderr.read()
            time.sleep(0.5)
        pids = [n["pid"] for n in json.loads(r.stdout)["nodes"]]
        assert len(domains("dh-lego3")) == 3 and all(alive(p) for p in pids)
    finally:
        up.send_signal(signal.SIGKILL)
        up.wait()
    # AUTODESTROY: the daemon destroys what the dead connection made.
    assert gone("dh-lego3", pids)


def test_an_unreachable_host_fails_naming_it_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(domain, "CONNECT_TIMEOUT", 2.0)
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # takes the connection, never answers
        uri = f"qemu+tcp://127.0.0.1:{silent.getsockname()[1]}/system"
        topo = topology.parse({"name": "far", "placement": "libvirt", "nodes": [
            {"name": "snode0", "role": "snode", "disk": "64MiB"},
            {"name": "mnode0", "role": "mnode", "host": uri}]}, "<test>")
        with pytest.raises(ClusterError, match=re.escape(f"mnode0: libvirt at {uri} (host "
                                                         "127.0.0.1:")):
            open_cluster(topo, run_dir=tmp_path, timeout=240)
    assert domains(f"dh-{tmp_path.name}-") == []


@pytest.fixture(scope="module")
def second_host():
    """A namespace joined by a veth pair, with a libvirt daemon of its own:
    (the namespace, this side's veth device, the daemon's URI)."""
    name = f"dh-lv{os.getpid()}"
    with netns.veth_host(name) as dev, netns.libvirt_host(name) as uri:
        yield name, dev, uri


def two_hosts(uri: str):
    return topology.parse({"name": "twohosts", "placement": "libvirt", "nodes": [
        {"name": "pnode0", "role": "pnode"},
        {"name": "mnode0", "role": "mnode", "host": uri},
        {"name": "snode0", "role": "snode", "disk": "64MiB"}], "links": [
        {"between": ["pnode0", "mnode0"], "kind": "tcp"},
        {"between": ["pnode0", "snode0"]}]}, "<test>")


def test_an_mnode_on_a_second_libvirt_host_links_across_the_veth(tmp_path, second_host):
    """A second host: a libvirt daemon of its own in a network namespace
    joined by a veth pair. The mnode's domain runs there (its QEMU in the
    namespace), the pnode's here, and their TCP stream crosses the veth. The
    mnode is a remote guest: nothing of it goes through the run directory
    (its control port is TCP its QEMU listens on, its agent comes from the
    checkout, its spec over libvirt's console stream)."""
    name, dev, uri = second_host
    prefix = f"dh-{tmp_path.name}-"
    crossed = veth_bytes(dev)
    with open_cluster(two_hosts(uri), run_dir=tmp_path, timeout=300) as c:
        assert domains(prefix) == [prefix + "pnode0", prefix + "snode0"]
        assert domains(prefix, uri) == [prefix + "mnode0"]
        in_ns = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                               text=True, timeout=10, check=True).stdout.split()
        assert any("qemu-system" in open(f"/proc/{p}/cmdline").read() for p in in_ns)
        xml = subprocess.run(["virsh", "-c", uri, "dumpxml", prefix + "mnode0"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        assert "type='unix'" not in xml and str(tmp_path) not in xml
        assert re.search(r"<channel type='tcp'>\s*<source mode='bind' host='"
                         + re.escape(netns.address(name)), xml)
        assert "dh.script=agent" in xml and "DH_PROJECT=" in xml
        console = (tmp_path / "mnode0.console.log").read_text(errors="replace")
        sent = base64.b64encode((tmp_path / "mnode0.json").read_bytes()).decode()
        assert "DH-SPEC?" in console and sent[:48] not in console  # a raw tty: no echo
        pnode = next(n["pid"] for n in c.status() if n["name"] == "pnode0")
        with open(f"/proc/{pnode}/cmdline") as f:  # its end joins the mnode's address
            assert f"host={netns.address(name)}," in f.read()
        before = veth_bytes(dev)
        for _ in range(20):
            c.call("pnode0", Op.PING, b"peers", timeout=30.0)
        assert veth_bytes(dev) > before  # the pings to mnode0 crossed it
        assert c.sql("SELECT count(*) FROM tasks") == [[0]]
        c.fault("mnode0", "kill")  # through the second daemon
        assert domains(prefix, uri) == []
        with pytest.raises(HarnessError, match="mnode0"):
            c.call("pnode0", Op.PING, b"peers", timeout=30.0)
    assert veth_bytes(dev) > crossed
    assert domains(prefix) == []


def test_a_second_host_with_other_code_is_refused_naming_it(tmp_path, second_host, monkeypatch):
    from harness.nodes import runners

    name, _, uri = second_host
    monkeypatch.setattr(runners, "code_fingerprint", lambda: "0123456789abcdef")
    with pytest.raises(ClusterError, match=re.escape(f"mnode0: the harness at {runners.PROJECT} "
                                                     f"on {netns.address(name)} is not this one")):
        open_cluster(two_hosts(uri), run_dir=tmp_path, timeout=300)
    assert domains(f"dh-{tmp_path.name}-", uri) == [] == domains(f"dh-{tmp_path.name}-")


def test_the_second_hosts_daemon_takes_no_other_user(second_host):
    """It has no authentication of its own: another local user reaching it
    would get libvirt's root, so its port is closed to every other user."""
    name, _, _ = second_host
    probe = (f"import socket; socket.create_connection(('{netns.address(name)}', "
             f"{netns.LIBVIRTD_TCP}), timeout=5)")
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                        sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "ConnectionRefusedError" in r.stderr
    socket.create_connection((netns.address(name), netns.LIBVIRTD_TCP), timeout=5).close()


def veth_bytes(dev: str) -> int:
    return sum(int(open(f"/sys/class/net/{dev}/statistics/{d}_bytes").read())
               for d in ("rx", "tx"))


SECOND_HOST = """
import sys
from harness.nodes import netns
with netns.libvirt_host(sys.argv[1]) as uri:
    print(uri, flush=True)
    sys.stdin.read()
"""


def test_the_second_hosts_daemon_goes_with_a_sigkilled_harness():
    name = f"dh-lk{os.getpid()}"
    with netns.veth_host(name):
        p = subprocess.Popen([sys.executable, "-c", SECOND_HOST, name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        try:
            uri = p.stdout.readline().strip()
            assert uri.startswith("qemu+tcp://")
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.split()
            assert pids
        finally:
            p.kill()
            p.wait()
        assert gone(name, [int(x) for x in pids])  # the watchdog killed them
        def rules() -> str:
            return subprocess.run(["iptables", "-w", "5", "-S", "OUTPUT"], capture_output=True,
                                  text=True, timeout=30, check=True).stdout
        deadline = time.monotonic() + 10
        while name in rules() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert name not in rules()  # and took its rule away


def test_up_status_sql_fault_down_on_two_libvirt_hosts(tmp_path, second_host):
    """The CLI on a topology file whose mnode is on the second host: up,
    status --json, sql, fault kill through that host's daemon, down; no
    domain is left on either daemon."""
    _, _, uri = second_host
    topo = tmp_path / "twohosts.toml"
    topo.write_text(f'''name = "twohosts"
placement = "libvirt"
[[nodes]]
name = "pnode0"
role = "pnode"
[[nodes]]
name = "mnode0"
role = "mnode"
host = "{uri}"
[[nodes]]
name = "snode0"
role = "snode"
disk = "64MiB"
[[links]]
between = ["pnode0", "mnode0"]
kind = "tcp"
[[links]]
between = ["pnode0", "snode0"]
''')
    env = {**os.environ, "HARNESS_RUN_DIR": str(tmp_path)}

    def harness(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*HARNESS, *args], capture_output=True, text=True, timeout=60,
                              env=env)

    up = subprocess.Popen([*HARNESS, "up", str(topo), "--timeout", "240"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while (r := harness("status", "--name", "twohosts", "--json")).returncode:
            assert up.poll() is None and time.monotonic() < deadline, up.stderr.read()
            time.sleep(0.5)
        nodes = {n["name"]: n for n in json.loads(r.stdout)["nodes"]}
        assert {n: v["state"] for n, v in nodes.items()} == {
            "pnode0": "ready", "mnode0": "ready", "snode0": "ready"}
        q = harness("sql", "--name", "twohosts", "--json", "SELECT count(*) FROM tasks")
        assert q.returncode == 0 and json.loads(q.stdout)["rows"] == [[0]], q.stderr
        assert len(domains("dh-twohosts", uri)) == 1
        f = harness("fault", "kill", "mnode0", "--name", "twohosts")
        assert f.returncode == 0, f.stderr
        assert domains("dh-twohosts", uri) == []
        down = harness("down", "--name", "twohosts")
        assert down.returncode == 0, down.stderr
        assert up.wait(60) == 0, up.stderr.read()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert domains("dh-twohosts") == [] == domains("dh-twohosts", uri)
