"""Where a node agent runs: a host process or a QEMU guest.

Both give the cluster the same things: a finished control link to the agent
(start() writes the agent's spec itself, from the node, the cluster's name
and secret and the links the cluster made), whether it is alive, its log,
and a stop that always leaves nothing running. The agent itself cannot tell
the difference except through the links it gets."""

from __future__ import annotations

import base64
import copy
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from harness import images
from harness._native.transport import Link, create_shm_file
from harness.errors import ClusterError, HarnessError, NotSupported
from harness.fingerprint import code_fingerprint
from harness.images import Image
from harness.nodes.agent import GUEST_RUN_DIR, READY, SPEC_PROMPT, SPEC_TIMEOUT
from harness.nodes.auth import authenticate
from harness.nodes.spec import AgentSpec, LinkEnd
from harness.progress import Progress, silent
from harness.topology import Node
from harness.vm import accel, rootfs, snapshot
from harness.vm.accel import AccelProbe
from harness.vm.disk import ensure_ext4
from harness.vm.domain import DomainVM, host_of
from harness.vm.machine import VM
from harness.vm.qemu import PROJECT, MachineConfig, guest_visible, ivshmem_address

READY_RE = re.compile(re.escape(READY.encode()) + rb" (\S+)")  # the agent's line, on a console
# A remote agent's, with its code's hash: the whole line (the console can
# come in pieces, and a prefix of the hash is not the hash).
SPEC_RE = re.compile(re.escape(SPEC_PROMPT.encode()) + rb" ([0-9a-f]+)\r?\n")
CONTROL_PORT = "dh.ctl"
REMOTE_AGENT = Path(__file__).resolve().parents[1] / "vm" / "remote" / "agent"
GUEST_DISK_DIR = "/run/dh/disk"  # where the guest mounts its disk


def _stopped(pid: int) -> bool:
    """Every thread of the process is stopped (state T in /proc)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] not in ("T", "t"):
                    return False
    except (OSError, IndexError):
        return False
    return True


def write_spec(node: Node, path: Path, cluster: str, secret: str, control: LinkEnd,
               links: list[LinkEnd], **placed: object) -> None:
    """The agent's spec: the node, its cluster, and the ends as its runner
    placed them; `placed` is what only the runner knows (parent_pid, data_dir)."""
    AgentSpec(name=node.name, role=node.role, nid=node.nid, cluster=cluster, secret=secret,
              placement=node.placement, control=control, links=links, **placed).dump(path)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ProcessRunner:
    """The agent as a host process, controlled over an shm ring; it dies
    with the controller (parent-death signal)."""

    accel = None

    def __init__(self, node: Node, run_dir: Path, shm_dir: Path, disk_dir: Path) -> None:
        self.node = node
        self.run_dir = run_dir
        self.shm_dir = shm_dir
        self.data_dir = disk_dir / f"{node.name}.data"  # the node's "disk": a host directory
        self.log_path = run_dir / f"{node.name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, cluster: str, links: list[LinkEnd], secret: str = "") -> Link:
        """Starts the agent on these ends (it inherits the "fd" ones); the
        controller's end of its control link."""
        ctl_path = self.shm_dir / f"controller-{self.node.name}.shm"
        ctl_path.unlink(missing_ok=True)  # a restart gets a fresh control channel
        ctl_path = str(ctl_path)
        create_shm_file(ctl_path, 1 << 22)
        control = Link.shm_open(ctl_path, 0, name=self.node.name)
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            spec_path = self.run_dir / f"{self.node.name}.json"
            write_spec(self.node, spec_path, cluster, secret,
                       LinkEnd("controller", "shm", True, path=ctl_path, side=1), links,
                       parent_pid=os.getpid(), data_dir=str(self.data_dir))
            with open(self.log_path, "wb") as log:
                # In a network namespace, `ip netns exec` enters it and execs
                # the agent: the same pid, still our child.
                enter = ["ip", "netns", "exec", self.node.netns] if self.node.netns else []
                self.proc = subprocess.Popen(
                    [*enter, sys.executable, "-m", "harness.nodes.agent", str(spec_path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=[e.fd for e in links if e.attach == "fd"], close_fds=True)
        except BaseException:
            control.close()
            raise
        return control

    def load(self) -> None:
        """Nothing to load: the agent started with its process."""

    def settle(self) -> Link | None:
        """Nothing to wait for: the agent started with its process."""
        return None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def console_ready(self) -> bool:
        return True  # a host process is asked with HELLO directly

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10.0)

    def pause(self) -> None:
        """Returns once the process is stopped (SIGSTOP lands asynchronously:
        a request sent right after kill() could still be answered)."""
        pid = self._pid()
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5.0
        while not _stopped(pid):
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.node.name} (pid {pid}) did not stop within 5 s")
            time.sleep(0.001)

    def resume(self) -> None:
        os.kill(self._pid(), signal.SIGCONT)

    def _pid(self) -> int:
        if not self.alive or self.proc is None:
            raise ClusterError(f"{self.node.name} is not running")
        return self.proc.pid

    def failure(self) -> str:
        code = self.proc.returncode if self.proc else None
        return (f"{self.node.name} exited with status {code} before it was ready; "
                f"its log ({self.log_path}) ends:\n{tail(self.log_path)}")

    def stop(self, timeout: float) -> bool:
        """True when the agent exited by itself with status 0."""
        if self.proc is None:
            return False
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5.0)
        return self.proc.returncode == 0


def guest_kit(names: list[str], say: Progress) -> tuple[Image, AccelProbe]:
    """The image and accelerator that VM nodes need. Without them the
    cluster does not start (it never runs the nodes as processes instead):
    the error names the fix."""
    who = ", ".join(names)
    try:
        image = images.build(progress=say)
    except HarnessError as exc:
        raise ClusterError(f"{who}: placed in VMs, but there is no guest image ({exc}); run "
                           "`harness images build` to build it, or place the nodes as "
                           "processes") from exc
    try:
        probe = accel.probe()
    except HarnessError as exc:
        raise ClusterError(f"{who}: placed in VMs, but QEMU cannot run guests here ({exc}); "
                           "`harness doctor` says what this host lacks, or place the nodes as "
                           "processes") from exc
    return image, probe


class VMRunner:
    """The agent in a QEMU guest, controlled over a virtio-serial port; the
    guest restored from its snapshot (taken on the first start) unless cold."""

    def __init__(self, node: Node, run_dir: Path, image: Image, accel: AccelProbe,
                 disk_dir: Path, deterministic: bool = False, cold: bool = False,
                 progress: Progress = silent, root: str | None = None) -> None:
        self.node = node
        self.run_dir = run_dir
        self.image = image
        self.accel = accel.accel
        self._probe = accel
        self.disk_dir = disk_dir
        self.deterministic = deterministic
        self.cold = cold
        self.say = progress
        self.root = root  # the root image of a snapshot start; built here if not given
        self.restored = False  # the last start came from a snapshot
        self.snapshot: str | None = None  # the key of the snapshot it loaded
        self.vm: VM | None = None
        self._restore: snapshot.Restore | None = None  # begun, not yet settled

    @property
    def log_path(self) -> Path:
        return self.run_dir / f"{self.node.name}.console.log"

    def start(self, cluster: str, links: list[LinkEnd], secret: str = "") -> Link:
        """Launches the guest with these ends as its devices; the
        controller's end of its control port. A server of a stream link
        listens once this returns (VM.launch), so start servers first."""
        if any(e.attach not in ("ivshmem", "dev") for e in links):
            raise NotSupported(f"{self.node.name}: a node in a VM links to other VMs only "
                               "(over ivshmem or a virtio-serial stream), not to processes")
        n = self.node.name
        # Each shm file becomes an ivshmem device; the guest finds it by PCI
        # address. Each stream is a virtio-serial port whose host side is a
        # socket shared with the peer's QEMU.
        shm, streams, guest_ends = [], [], []
        for end in links:
            if end.attach == "ivshmem":
                shm.append(Path(end.path))
                end = copy.copy(end)  # the cluster's end keeps its host path
                end.path = ivshmem_address(len(shm) - 1)
            else:
                streams.append((end.path.rsplit("/", 1)[1], end.chardev))
            guest_ends.append(end)
        disk = None
        if self.node.disk:
            disk = self._disk()
        write_spec(self.node, self.run_dir / f"{n}.json", cluster, secret,
                   LinkEnd("controller", "dev", True, path=f"/dev/virtio-ports/{CONTROL_PORT}"),
                   guest_ends, data_dir=GUEST_DISK_DIR if disk else "")
        cfg = MachineConfig(name=n, image=self.image, accel=self._probe, run_dir=self.run_dir,
                            memory=self.node.memory, cpus=self.node.cpus, disk=disk,
                            ports=[CONTROL_PORT], deterministic=self.deterministic,
                            shm=shm, streams=streams)
        self.restored = not self.cold and snapshot.why_not(cfg) is None
        if not self.restored:
            return self._boot(cfg, secret)
        cfg = replace(cfg, snap=True, root=self.root or rootfs.build(self.say).path,
                      ports=[CONTROL_PORT, snapshot.GO_PORT])
        self._restore = snapshot.restore(cfg, snapshot.WAITING_RE, {
            "dh.rundir": str(self.run_dir.resolve()),
            "dh.keep": ",".join(map(str, guest_visible()))}, self.say)
        self.vm = self._restore.vm
        return self._hand_control()

    def _hand_control(self) -> Link:
        """The agent's spec (the cluster's secret in it) goes over the
        control port, never into the snapshot: a length, then the JSON
        (held in the socket until the restored guest reads it)."""
        spec = (self.run_dir / f"{self.node.name}.json").read_bytes()
        ctl = self.vm.ports[CONTROL_PORT]
        ctl.sendall(struct.pack("<I", len(spec)) + spec)
        return Link.from_fd(ctl.fileno(), name=self.node.name)

    def load(self) -> None:
        """Starts loading a begun restore's state (the cluster starts every
        node's QEMU first: none then starts beside guests already running)."""
        if self._restore is not None:
            self._restore.load()

    def settle(self) -> Link | None:
        """Lets a restored guest run once its state has loaded (the cluster
        begins every restore first, so they load side by side); a new
        control link if the snapshot had to be taken again."""
        restore, self._restore = self._restore, None
        if restore is None:
            return None
        vm = restore.wait()
        self.snapshot = restore.snap.key
        if vm is self.vm:
            return None
        self.vm = vm
        return self._hand_control()

    def _boot(self, cfg: MachineConfig, secret: str) -> Link:
        """A cold boot; the agent reads its spec in the run directory."""
        # Straight into Python, no shell: -S skips site.py, whose path
        # scanning over 9p costs a TCG guest most of a second.
        n = self.node.name
        script = self.run_dir / f"{n}.agent"
        script.write_text(f"#!{sys.executable} -S\n"
                          f"import sys\nsys.path[:0] = [{str(PROJECT)!r}]\n"
                          "from harness.nodes.agent import main\n"
                          f"sys.exit(main([{GUEST_RUN_DIR + '/' + n + '.json'!r}]))\n")
        script.chmod(0o755)
        self.vm = self._machine(replace(cfg, script=script.name)).launch()
        return Link.from_fd(self.vm.ports[CONTROL_PORT].fileno(), name=n)

    def _machine(self, cfg: MachineConfig) -> VM:
        return VM(cfg)

    def _disk(self) -> Path:
        """The node's disk. A new snode disk comes with its database made on
        the host: creating the schema costs a TCG guest ~0.45 s of its start."""
        path = self.disk_dir / f"{self.node.name}.ext4"
        if self.node.role != "snode" or path.exists():
            return ensure_ext4(path, self.node.disk)
        import tempfile

        from harness.dbos.store import Store
        from harness.nodes.snode import DB_NAME

        with tempfile.TemporaryDirectory(prefix="dh-seed-") as seed:
            Store.open(Path(seed) / DB_NAME).close()
            return ensure_ext4(path, self.node.disk, Path(seed))

    @property
    def alive(self) -> bool:
        return self.vm is not None and self.vm.alive

    @property
    def pid(self) -> int | None:
        return self.vm.pid if self.vm else None

    def console_ready(self) -> bool:
        return self.vm is not None and self.vm.console_has(READY_RE)

    def kill(self) -> None:
        """A power cut: QEMU gets SIGKILL."""
        if self.vm is not None:
            self.vm.stop()

    def pause(self) -> None:
        self._running_vm().qmp("stop")

    def resume(self) -> None:
        self._running_vm().qmp("cont")

    def _running_vm(self) -> VM:
        if self.vm is None or not self.vm.alive:
            raise ClusterError(f"{self.node.name} is not running")
        return self.vm

    def failure(self) -> str:
        code = self.vm.exit_code if self.vm else None
        tail_text = self.vm.console_tail() if self.vm else "(not started)"
        return (f"{self.node.name}: QEMU exited with status {code} before the agent was ready; "
                f"the console ({self.log_path}) ends:\n{tail_text}")

    def stop(self, timeout: float) -> bool:
        if self.vm is None:
            return False
        code = self.vm.stop(grace=timeout)
        return code == 0


class LibvirtRunner(VMRunner):
    """The agent in a guest that libvirt runs, on the host node.host names
    (harness/vm/domain.py): the guest a VM node gets, booted cold."""

    def __init__(self, node: Node, run_dir: Path, image: Image, accel: AccelProbe,
                 disk_dir: Path, progress: Progress = silent) -> None:
        super().__init__(node, run_dir, image, accel, disk_dir, cold=True, progress=progress)
        self._handshake: threading.Thread | None = None  # a remote guest's spec and proof
        self._handshake_error: HarnessError | None = None

    @property
    def domain_name(self) -> str:
        return f"dh-{self.run_dir.name}-{self.node.name}"  # unique per cluster run

    def _machine(self, cfg: MachineConfig) -> VM:
        return DomainVM(cfg, self.node.host, self.domain_name)

    def _boot(self, cfg: MachineConfig, secret: str) -> Link:
        """On another host (no run directory there) init runs the agent from
        the harness's checkout at this path; the spec goes on the console,
        over libvirt's connection, and the TCP control link is proven with
        the cluster's secret before it carries anything. That happens on a
        thread: a stream's server must not wait for its guest to boot before
        its clients start (a guest that opens its port before the peer's
        QEMU has joined reads end-of-file)."""
        self._handshake = None  # an earlier start's thread reports nothing more
        if host_of(self.node.host) == "this machine":  # as DomainVM sees it: no lookup
            return super()._boot(cfg, secret)
        n = self.node.name
        if self.node.host.startswith("qemu+tcp:"):
            self.say(f"warning: {n}: its spec, with the cluster's secret, goes to "
                     f"{host_of(self.node.host)} in clear (qemu+tcp); between machines use "
                     "qemu+ssh:// or qemu+tls://")
        vm = self._machine(replace(
            cfg, guest_run_dir=str(REMOTE_AGENT.parent), script=REMOTE_AGENT.name,
            extra_params=f"DH_PYTHON={sys.executable} DH_PROJECT={PROJECT}")).launch()
        self.vm = vm
        link = Link.from_fd(vm.ports[CONTROL_PORT].fileno(), name=n)
        spec = (self.run_dir / f"{n}.json").read_bytes()
        self._handshake_error = None  # before the thread: it may fail at once
        self._handshake = threading.Thread(target=self._hand_spec, args=(vm, spec, secret, link),
                                           name=f"spec-{n}", daemon=True)
        self._handshake.start()
        return link

    def _hand_spec(self, vm: DomainVM, spec: bytes, secret: str, link: Link) -> None:
        host = host_of(self.node.host)
        try:
            try:
                m = vm.wait_for(SPEC_RE, SPEC_TIMEOUT,
                                f"{SPEC_PROMPT} (its agent asking for its spec)")
            except HarnessError as exc:
                raise HarnessError(f"{exc}\n{self._checkout_hint()}") from exc
            theirs, ours = m.group(1).decode(), code_fingerprint()
            if theirs != ours:
                raise HarnessError(f"the harness at {PROJECT} on {host} is not this one (its "
                                   f"code {theirs}, here {ours}): check out the same commit "
                                   "there and run `bash scripts/setup.sh`")
            vm.send_console(base64.b64encode(spec) + b"\n")
            authenticate(link, bytes.fromhex(secret), self.node.name, SPEC_TIMEOUT)
        except Exception as exc:  # whatever it was, the start must hear of it
            err = exc if isinstance(exc, HarnessError) else HarnessError(
                f"handing its spec over failed: {type(exc).__name__}: {exc}")
            if threading.current_thread() is self._handshake:  # not an earlier start's
                self._handshake_error = err

    def _checkout_hint(self) -> str:
        return (f"Is the harness checked out at {PROJECT} on {host_of(self.node.host)}, with its "
                f"venv's {sys.executable}? (`bash scripts/setup.sh` there)")

    def failure(self) -> str:
        text = super().failure()
        return f"{text}\n{self._checkout_hint()}" if self._handshake is not None else text

    def console_ready(self) -> bool:
        """READY, and (on another host) the controller's half of the
        handshake done: nothing else may use the control link before."""
        if self._handshake is None:
            return super().console_ready()
        if self._handshake_error is not None:
            msg = str(self._handshake_error)
            raise ClusterError(msg if msg.startswith(f"{self.node.name}:")
                               else f"{self.node.name}: {msg}")
        return super().console_ready() and not self._handshake.is_alive()

    def pause(self) -> None:
        self._running_domain().suspend()

    def resume(self) -> None:
        self._running_domain().resume()

    def _running_domain(self) -> DomainVM:
        vm = self._running_vm()
        assert isinstance(vm, DomainVM)
        return vm
