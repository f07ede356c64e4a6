"""DBOS in the snode's guest, on its own ext4 disk: the round trip, and
committed rows surviving the VM being killed mid-transaction."""

import signal
import threading

from harness import topology
from harness.errors import HarnessError
from harness.nodes.cluster import Cluster

BATCH = ("INSERT INTO messages (receiver_id, sender_id, data, sent) "
         "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50) "
         "SELECT ?, 'host', x'00', 0 FROM n")


def snode_topology() -> topology.Topology:
    return topology.parse({"name": "dbos-vm", "placement": "vm",
                           "nodes": [{"name": "snode0", "role": "snode", "disk": "64MiB"}]},
                          "<test>")


def test_dbos_round_trip_in_the_guest(tmp_path):
    with Cluster(snode_topology(), disk_dir=tmp_path).start(timeout=120) as c:
        assert c.stats()["snode0"]["dbos"]["path"] == "/run/dh/disk/dbos.sqlite"
        c.dbos.fs.mkdir("/data")
        c.dbos.fs.create("/data/f")
        c.dbos.fs.write("/data/f", 0, b"on the guest's ext4")
        assert c.dbos.fs.read("/data/f") == b"on the guest's ext4"
        assert c.sql("SELECT name, role FROM nodes") == [["snode0", "snode"]]


def test_committed_rows_survive_killing_the_vm(tmp_path):
    c = Cluster(snode_topology(), disk_dir=tmp_path).start(timeout=120)
    acked: list[int] = []
    enough = threading.Event()

    def write() -> None:
        i = 0
        while True:
            i += 1
            try:
                c.sql(BATCH, [f"b{i}"], write=True)
            except HarnessError:
                return
            acked.append(i)
            if i == 20:
                enough.set()

    th = threading.Thread(target=write)
    th.start()
    assert enough.wait(120)
    vm = c.nodes["snode0"].runner.vm
    vm.child.kill(signal.SIGKILL)  # power cut, from the guest's point of view
    th.join(60)
    c.stop()
    with Cluster(snode_topology(), disk_dir=tmp_path).start(timeout=120) as again:
        counts = dict(again.sql("SELECT receiver_id, count(*) FROM messages GROUP BY 1"))
    for b in acked:
        assert counts.get(f"b{b}") == 50, f"batch {b} was acknowledged but is gone"
    assert set(counts.values()) == {50}, "a half-written transaction is visible"


def test_a_committed_row_survives_killing_and_restarting_the_snode_vm(tmp_path):
    with Cluster(snode_topology(), disk_dir=tmp_path).start(timeout=120) as c:
        c.sql("INSERT INTO nodes (name, role, updated) VALUES ('kept', 'pnode', 0)", write=True)
        c.fault("snode0", "kill")
        c.fault("snode0", "restart")
        assert c.sql("SELECT name FROM nodes WHERE name = 'kept'") == [["kept"]]
        assert c.status()[0]["state"] == "ready"


def test_the_pnode_guest_reconnects_to_a_restarted_snode_vm(tmp_path):
    """lego3 in VMs: the snode's QEMU is killed and the node restarted on its
    disk; the pnode guest's link (ivshmem, reset) is opened again and its
    task worker claims work from the new snode."""
    from harness.nodes.cluster import open_cluster

    with open_cluster("lego3", placement="vm", run_dir=tmp_path, timeout=300) as c:
        c.fault("snode0", "kill")
        c.fault("snode0", "restart")
        tid = c.dbos.sched.submit(["sh", "-c", "echo after the restart"])
        assert c.wait_tasks([tid], timeout=120) == 1
