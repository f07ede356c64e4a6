"""`harness boot` and the launcher, as a user meets them."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from harness.errors import BootTimeout, LaunchError
from harness.nodes.runners import READY_RE
from harness.vm.machine import EXIT_RE

from ..unit.helpers import alive

HARNESS = [sys.executable, "-m", "harness.cli"]


def harness(*args, env=None, timeout=180):
    return subprocess.run([*HARNESS, *args], capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_output_and_exit_status_pass_through():
    r = harness("boot", "--", "sh", "-c", "echo hi; echo oops >&2; exit 7")
    assert r.returncode == 7
    assert r.stdout == b"hi\n"
    assert r.stderr.endswith(b"oops\n")


def test_command_runs_in_the_callers_directory_with_the_host_programs():
    r = harness("boot", "--", "sh", "-c",
                "pwd; python3 -c 'import sys; print(sys.version_info[0])'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == [os.getcwd(), "3"]


def test_the_guest_has_protection_keys():
    r = harness("boot", "--", "grep", "-c", "-w", "pku", "/proc/cpuinfo")
    assert r.returncode == 0 and int(r.stdout) >= 1


def test_snode_disk_survives_a_restart(tmp_path):
    env = {"HARNESS_DATA_DIR": str(tmp_path)}
    w = harness("boot", "--role", "snode", "--", "sh", "-c",
                "echo kept > /run/dh/disk/note && sync", env=env)
    assert w.returncode == 0, w.stderr
    r = harness("boot", "--role", "snode", "--", "cat", "/run/dh/disk/note", env=env)
    assert (r.returncode, r.stdout) == (0, b"kept\n"), r.stderr
    assert (tmp_path / "disks" / "boot-snode.ext4").exists()


def test_images_build_json_has_the_documented_keys():
    r = harness("images", "build", "--json")
    out = json.loads(r.stdout)
    assert {"kernel", "vmlinux", "initramfs", "kernel_version"} <= set(out)
    assert os.path.exists(out["initramfs"]) and out["kernel_version"]


def test_sigkill_of_the_harness_leaves_no_qemu():
    p = subprocess.Popen([*HARNESS, "boot", "--", "sleep", "120"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    qemu = None
    deadline = time.monotonic() + 60
    while qemu is None and time.monotonic() < deadline:
        kids = subprocess.run(["pgrep", "-P", str(p.pid), "qemu-system"], capture_output=True,
                              text=True).stdout.split()
        qemu = int(kids[0]) if kids else None
        time.sleep(0.1)
    assert qemu is not None, "the harness never started QEMU"
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 10
    while alive(qemu) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(qemu)


def test_missing_qemu_names_the_fix(tmp_path):
    (tmp_path / "bin").mkdir()
    for tool in ("apt-cache", "dpkg-deb", "depmod", "sh"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), tmp_path / "bin" / tool)
    r = harness("boot", "--", "true", env={"PATH": str(tmp_path / "bin")})
    assert r.returncode == 1
    assert b"qemu-system-x86_64 not found" in r.stderr and b"apt-get install" in r.stderr


def test_corrupt_kernel_names_the_fix(tmp_path, image):
    cache = tmp_path / "cache"
    (cache / "images").mkdir(parents=True)
    shutil.copytree(image.dir, cache / "images" / image.key)
    manifest = cache / "images" / image.key / "manifest.json"
    m = json.loads(manifest.read_text())
    for k in ("kernel", "vmlinux", "initramfs"):
        if m[k]:
            m[k] = m[k].replace(str(image.dir), str(cache / "images" / image.key))
    manifest.write_text(json.dumps(m))
    (cache / "images" / image.key / "vmlinux").write_bytes(b"\x7fELF this is not a kernel")
    real = os.environ.get("HARNESS_CACHE_DIR")
    env = {"HARNESS_CACHE_DIR": str(cache)}
    if real is None:  # keep the kernel resolution cached, so nothing is downloaded
        from harness.paths import cache_dir
        shutil.copy(cache_dir() / "kernel-resolution.json", cache / "kernel-resolution.json")
    r = harness("boot", "--", "true", env=env, timeout=60)
    assert r.returncode == 1
    assert b"harness images build --force" in r.stderr, r.stderr


def test_a_guest_that_never_gets_ready_times_out_with_its_console(make_vm):
    vm = make_vm("#!/bin/sh\necho 'agent is thinking'\nsleep 300\n").launch()
    # A loaded host boots late: the timeout under test starts once the guest runs.
    vm.wait_for(re.compile(rb"agent is thinking"), 120, "the script's line")
    with pytest.raises(BootTimeout) as e:
        vm.wait_for(READY_RE, 3, "DH-READY")
    assert "no DH-READY on the console within 3 s" in str(e.value)
    assert "agent is thinking" in e.value.console


def test_qemu_that_dies_early_is_a_launch_error(make_vm, image):
    vm = make_vm("#!/bin/sh\ntrue\n", memory=1 << 50)  # more memory than can exist
    with pytest.raises(LaunchError) as e:
        vm.launch().wait_for(EXIT_RE, 30, "DH-EXIT")
    assert e.value.cmdline and e.value.exit_code not in (None, 0)


def test_qmp_status_stop_and_cont(make_vm):
    vm = make_vm("#!/bin/sh\nsleep 300\n").launch()
    assert vm.qmp("query-status")["status"] == "running"
    vm.qmp("stop")
    assert vm.qmp("query-status")["status"] == "paused"
    vm.qmp("cont")
    assert vm.qmp("query-status")["running"] is True
    assert vm.stop() is not None and not vm.alive


def test_deterministic_mode_repeats_in_guest_timings():
    # The fastest of five windows: one a timer tick happened to land in is longer.
    code = ("import time\nbest = None\nfor _ in range(5):\n"
            "    t = time.perf_counter_ns(); sum(range(200000))\n"
            "    d = time.perf_counter_ns() - t; best = d if best is None else min(best, d)\n"
            "print(best)")
    runs = []
    for _ in range(2):
        r = harness("boot", "--deterministic", "--", "python3", "-c", code)
        assert r.returncode == 0, r.stderr
        runs.append(int(r.stdout))
    # Instruction counting, not a stopwatch: the host's load does not enter.
    assert abs(runs[0] - runs[1]) <= runs[0] * 0.001, runs
