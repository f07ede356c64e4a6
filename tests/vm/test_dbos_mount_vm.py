"""The DBOS mount inside a pnode guest: programs there keep their files in
the snode guest's tables, over the pnode's own link, and what they fsynced
survives the snode VM's power cut."""

import time

from harness import topology
from harness.nodes.cluster import Cluster


def split_topology() -> topology.Topology:
    return topology.parse({
        "name": "files-vm", "placement": "vm",
        "nodes": [{"name": "pnode0", "role": "pnode"},
                  {"name": "snode0", "role": "snode", "disk": "64MiB"}],
        "links": [{"between": ["pnode0", "snode0"], "kind": "shm", "size": "4MiB"}]}, "<test>")


WRITE = ("import os\n"
         "fd = os.open('/tmp/dbos/notes', os.O_CREAT | os.O_WRONLY, 0o600)\n"
         "os.write(fd, b'kept in snode0'); os.fsync(fd); os.close(fd)\n")


def test_a_pnode_guest_program_writes_through_the_mount_and_the_data_outlives_a_power_cut(
        tmp_path):
    files = {"path": "/tmp/dbos", "task": None, "source": "files-vm/snode0"}
    with Cluster(split_topology(), disk_dir=tmp_path).start(timeout=180) as c:
        r = c.exec("pnode0", ["python3", "-c", WRITE], timeout=120, files=files)
        assert r.returncode == 0, r.stderr
        r = c.exec("pnode0", ["sh", "-c", "cat /tmp/dbos/notes; stat -c %a /tmp/dbos/notes"],
                   timeout=120, files=files)
        assert r.stdout == b"kept in snode0" + b"600\n"  # the data, then its mode
        assert c.sql("SELECT size, mode & 511 FROM files WHERE name = 'notes'") == [[14, 0o600]]
        progs = {p for (p,) in c.sql("SELECT DISTINCT program FROM events WHERE program "
                                     "IS NOT NULL")}
        assert {"python3", "cat"} <= progs, progs
        c.fault("snode0", "kill")  # QEMU SIGKILLed: a power cut for the snode
        c.fault("snode0", "restart")
        deadline = time.monotonic() + 60
        while True:
            r = c.exec("pnode0", ["cat", "/tmp/dbos/notes"], timeout=120, files=files)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)  # the pnode's link to the restarted snode comes back
        assert r.stdout == b"kept in snode0", r.stderr
