"""QEMU guests run by libvirt: the machine qemu.py describes, as a domain.

A node placed with libvirt gets the guest a VM node gets (the same kernel,
initramfs and kernel command line, the host root over 9p, the virtio-serial
ports, the snode's disk, the ivshmem channels at the same PCI slots), but
libvirt's QEMU runs it, on the host a URI names. Each is a transient domain
created with AUTODESTROY: libvirt destroys it when the connection that made
it closes, so none outlives the harness, even a SIGKILLed one, and none is
ever left defined (`virsh list --all` shows it only while it runs). Its name
is dh-<cluster run>-<node>.

The domain runs as the harness's user and group (a static DAC label, no
relabelling): the run directory, the image cache and the sockets QEMU joins
are private to that user. The console is read through libvirt (a console
stream opened while the domain is still paused, so no line is lost).

Every connection is served by libvirt's event loop on one thread of ours:
the console streams are non-blocking and read from its callbacks, and each
connection has a keepalive. A blocking stream read would share the
connection with the calls other threads make, and libvirt's client can
leave such a call waiting forever behind it (a kill that never returned);
a host that stops answering fails its calls after KEEPALIVE instead of
hanging them."""

from __future__ import annotations

import functools
import logging
import os
import queue
import re
import socket
import threading
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from harness.errors import ClusterError, HarnessError, LaunchError, NotSupported
from harness.vm.machine import VM
from harness.vm.qemu import IVSHMEM_SLOT, MachineConfig, kernel_params
from harness.vm.streams import free_port

CONNECT_TIMEOUT = 10.0
KEEPALIVE = (5, 3)  # a probe every 5 s; 3 unanswered close the connection
SHM = Path("/dev/shm")  # libvirt's <shmem name=N> is /dev/shm/N
log = logging.getLogger("harness.domain")


@functools.cache
def _libvirt():
    try:
        import libvirt
    except ImportError as exc:
        raise HarnessError("placement \"libvirt\" needs libvirt-python: `bash scripts/setup.sh` "
                           "installs it (it builds against Debian's libvirt-dev)") from exc
    # libvirt prints every error on stderr as well as raising it; ours say more.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    # Before the first connection: the loop serves every one opened after it.
    libvirt.virEventRegisterDefaultImpl()
    threading.Thread(target=_run_events, args=(libvirt,), name="libvirt-events",
                     daemon=True).start()
    return libvirt


def _run_events(libvirt) -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as exc:  # one bad turn must not end every console
            log.warning("libvirt's event loop: %s", exc.get_error_message())
            time.sleep(0.1)


def host_of(uri: str) -> str:
    """The host part of a libvirt URI ('this machine' for qemu:///system)."""
    m = re.match(r"^[^:]+://([^/]*)/", uri)
    host = m.group(1).rpartition("@")[2] if m else ""
    return host or "this machine"


def host_address(uri: str) -> str | None:
    """The IPv4 address of the host a libvirt URI names; None for this
    machine (qemu:///system, or no URI: a node that is not libvirt's)."""
    host = host_of(uri) if uri else "this machine"
    if host == "this machine":
        return None
    name = host.rpartition(":")[0] if host.count(":") == 1 else host
    try:
        return socket.gethostbyname(name)
    except OSError as exc:
        raise ClusterError(f"cannot resolve host {name} of libvirt URI {uri}: {exc}") from exc


def connect(uri: str, timeout: float | None = None):
    """A connection to the libvirt daemon at uri, or ClusterError naming the
    host and the URI within timeout (an unreachable host would otherwise
    hang for as long as TCP or ssh keeps trying)."""
    libvirt = _libvirt()
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    got: dict = {}

    def attempt() -> None:
        try:
            conn = libvirt.open(uri)
            conn.setKeepAlive(*KEEPALIVE)
            got["conn"] = conn
        except libvirt.libvirtError as exc:
            got["error"] = exc

    t = threading.Thread(target=attempt, name=f"libvirt-open {uri}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise ClusterError(f"libvirt at {uri} (host {host_of(uri)}) did not answer within "
                           f"{timeout:g} s: check that the host is up and runs libvirtd; "
                           "`harness doctor --topology FILE` checks every URI of a topology")
    if "error" in got:
        host = host_of(uri)
        fix = ("`bash scripts/libvirtd.sh` starts the daemon here" if host == "this machine"
               else f"check that libvirtd runs on {host} and takes this URI's transport")
        raise ClusterError(f"cannot connect to libvirt at {uri} (host {host}): "
                           f"{got['error'].get_error_message()}; {fix}")
    return got["conn"]


def _channel(port: str, backend: str) -> str:
    """A virtio-serial port whose host side is a QEMU chardev backend string
    (streams.chardevs): a Unix or TCP socket, listening or connecting."""
    kind, _, opts = backend.partition(",")
    kv = dict(o.partition("=")[::2] for o in opts.split(",") if o)
    if kind != "socket":
        raise NotSupported(f"port {port}: no libvirt channel for chardev {kind!r}")
    mode = "bind" if kv.get("server") == "on" else "connect"
    reconnect = "" if mode == "bind" else "<reconnect enabled='yes' timeout='1'/>"
    target = f"<target type='virtio' name={quoteattr(port)}/>"
    if "path" in kv:
        return (f"<channel type='unix'><source mode='{mode}' path={quoteattr(kv['path'])}>"
                f"{reconnect}</source>{target}</channel>")
    return (f"<channel type='tcp'><source mode='{mode}' host={quoteattr(kv['host'])} "
            f"service={quoteattr(kv['port'])}>{reconnect}</source>"
            f"<protocol type='raw'/>{target}</channel>")


def _cpu(cfg: MachineConfig) -> str:
    if cfg.accel.accel != "kvm":
        return "<cpu mode='maximum'/>"  # -cpu max: TCG's protection keys too
    disable = "".join(f"<feature policy='disable' name={quoteattr(f[1:])}/>"
                      for f in cfg.accel.cpu.split(",")[1:] if f.startswith("-"))
    return f"<cpu mode='host-passthrough'>{disable}</cpu>"


def shm_name(domain: str, index: int) -> str:
    """The name in /dev/shm of a domain's index-th ivshmem file: libvirt
    takes a bare name there (no '/'), so each is a symlink to the channel
    file in the cluster's private directory."""
    return f"{domain}.shm{index}"


def domain_xml(cfg: MachineConfig, name: str, ports: dict[str, str] | None = None) -> str:
    """The domain for one guest, from the configuration the launcher uses;
    ports: the chardev backend of each port, if not the controller's socket."""
    if cfg.deterministic:
        raise NotSupported(f"{cfg.name}: deterministic mode needs QEMU's -icount, which a "
                           "libvirt domain cannot ask for; place the node with \"vm\"")
    if cfg.snap or cfg.root or cfg.incoming:
        raise NotSupported(f"{cfg.name}: libvirt nodes boot cold (no snapshot starts)")
    devices = [f"<emulator>{escape(cfg.accel.qemu)}</emulator>",
               "<serial type='pty'><target port='0'/></serial><console type='pty'/>",
               "<controller type='usb' model='none'/>", "<memballoon model='none'/>"]
    if cfg.mode == "run":
        devices.append("<filesystem type='mount' accessmode='squash' multidevs='remap'>"
                       "<source dir='/'/><target dir='hostroot'/><readonly/></filesystem>")
        devices += [_channel(p, (ports or {}).get(p, f"socket,path={cfg.port_socket(p)}"))
                    for p in cfg.ports]
        devices += [_channel(p, backend) for p, backend in cfg.streams]
        for i, path in enumerate(cfg.shm):
            devices.append(
                f"<shmem name={quoteattr(shm_name(name, i))}>"
                "<model type='ivshmem-plain'/>"
                f"<size unit='B'>{path.stat().st_size}</size>"
                f"<address type='pci' domain='0' bus='0' slot='{IVSHMEM_SLOT + i}' "
                "function='0'/></shmem>")
        if cfg.disk is not None:
            devices.append("<disk type='file' device='disk'>"
                           "<driver name='qemu' type='raw' cache='writeback'/>"
                           f"<source file={quoteattr(str(cfg.disk))}/>"
                           "<target dev='vda' bus='virtio'/></disk>")
    return (f"<domain type='{'kvm' if cfg.accel.accel == 'kvm' else 'qemu'}'>"
            f"<name>{escape(name)}</name>"
            f"<memory unit='b'>{cfg.memory}</memory><vcpu>{cfg.cpus}</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type>"
            f"<kernel>{escape(cfg.image.boot_kernel)}</kernel>"
            f"<initrd>{escape(cfg.image.initramfs)}</initrd>"
            f"<cmdline>{escape(kernel_params(cfg))}</cmdline></os>"
            f"<features><acpi/></features>{_cpu(cfg)}"
            "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>"
            "<on_crash>destroy</on_crash>"
            "<seclabel type='static' model='dac' relabel='no'>"
            f"<label>+{os.getuid()}:+{os.getgid()}</label></seclabel>"
            f"<devices>{''.join(devices)}</devices></domain>")


class DomainVM(VM):
    """A VM whose QEMU libvirt runs: the same launch, console and stop as
    VM's, through a libvirt connection instead of a child process. No QMP:
    libvirt owns the monitor (pause and resume go through libvirt).

    On another host (remote: its address) the guest's QEMU listens for
    each port on a TCP port there, and the controller connects: the
    controller's Unix sockets are not on that host, and a connection it
    makes cannot be someone else's taking the port first."""

    def __init__(self, cfg: MachineConfig, uri: str, domain_name: str) -> None:
        self.uri = uri
        self.domain_name = domain_name
        self.remote = host_address(uri)
        self._tcp_ports = {p: free_port() for p in cfg.ports} if self.remote else {}
        self._conn = None
        self._dom = None
        self._stream = None
        self._chunks: queue.Queue[bytes | None] = queue.Queue()  # the console, from the loop
        self._destroyed = False  # by us: not a clean power-off
        super().__init__(cfg)
        self.cmdline = [f"virsh -c {uri} create <domain {domain_name}>"]  # for error messages
        self.xml = domain_xml(cfg, domain_name, {
            p: f"socket,host={self.remote},port={port},server=on"
            for p, port in self._tcp_ports.items()})

    def _sockets(self) -> list[Path]:
        return [] if self.remote else [self.cfg.port_socket(p) for p in self.cfg.ports]

    @property
    def _shm_links(self) -> list[Path]:
        return [SHM / shm_name(self.domain_name, i) for i in range(len(self.cfg.shm))]

    def _pre_launch(self) -> None:
        for link, target in zip(self._shm_links, self.cfg.shm, strict=True):
            link.unlink(missing_ok=True)  # left by a run that was SIGKILLed
            os.symlink(target.resolve(), link)
        super()._pre_launch()

    def _launch(self) -> None:
        libvirt = _libvirt()
        try:
            self._conn = connect(self.uri)
        except ClusterError as exc:
            raise ClusterError(f"{self.name}: {exc}") from exc
        try:
            # Paused until the console is open: a pty drops what nobody reads.
            self._dom = self._conn.createXML(self.xml, libvirt.VIR_DOMAIN_START_AUTODESTROY
                                             | libvirt.VIR_DOMAIN_START_PAUSED)
            self._stream = self._conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
            self._dom.openConsole(None, self._stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
            self._stream.eventAddCallback(
                libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR
                | libvirt.VIR_STREAM_EVENT_HANGUP, self._on_console, None)
        except libvirt.libvirtError as exc:
            raise LaunchError(f"{self.name}: libvirt at {self.uri} could not start domain "
                              f"{self.domain_name}: {exc.get_error_message()}",
                              cmdline=self.cmdline) from exc
        self.launched_at = time.monotonic()
        self._reader = threading.Thread(target=self._drain, name=f"console-{self.name}",
                                        daemon=True)
        self._reader.start()
        self._dom.resume()

    def _post_launch(self, deadline: float) -> None:
        for port in self.cfg.ports:
            self.ports[port] = (self._connect((self.remote, self._tcp_ports[port]), deadline)
                                if self.remote else
                                self._accept(self.cfg.port_socket(port), deadline))

    def _connect(self, addr: tuple[str, int], deadline: float) -> socket.socket:
        """A connection to a port the guest's QEMU listens on (it binds it
        as the domain starts; refused until then)."""
        while True:
            try:
                s = socket.create_connection(addr, timeout=2.0)
                s.settimeout(None)
                return s
            except OSError as exc:
                if not self.alive:
                    raise self.died(f"before it listened on {addr[0]}:{addr[1]}") from exc
                if time.monotonic() > deadline:
                    raise LaunchError(f"{self.name}: QEMU on {host_of(self.uri)} did not listen "
                                      f"on {addr[0]}:{addr[1]} in time ({exc}); check that "
                                      "this machine can reach that host on TCP ports",
                                      cmdline=self.cmdline, console=self.console_tail()) from exc
                time.sleep(0.05)

    def send_console(self, data: bytes, timeout: float = 10.0) -> None:
        """Writes data to the guest's serial console, over libvirt's
        connection (encrypted by ssh or TLS on a remote URI)."""
        deadline = time.monotonic() + timeout
        while data:
            sent = self._stream.send(data)
            if sent == -2:  # the stream is full for now
                if time.monotonic() > deadline:
                    raise LaunchError(f"{self.name}: its console took no input for {timeout:g} s",
                                      cmdline=self.cmdline, console=self.console_tail())
                time.sleep(0.01)
                continue
            data = data[sent:]

    def _on_console(self, stream, _events: int, _opaque: object) -> None:
        """On the event loop: whatever the console has, without blocking."""
        while True:
            try:
                data = stream.recv(65536)
            except Exception:  # the domain is gone, and its console with it
                data = b""
            if data == -2:  # nothing more for now
                return
            if not data:
                self._console_end(stream)
                return
            self._chunks.put(data)

    def _console_end(self, stream) -> None:
        try:
            stream.eventRemoveCallback()
        except Exception:  # already removed, or the stream is gone
            pass
        # Else the stream's __del__ removes the callback again, on whichever
        # thread drops it last: on the event loop's, inside its own lock.
        try:
            del stream.cb
        except AttributeError:
            pass
        self._chunks.put(None)

    def _console_read(self) -> bytes | None:
        try:
            return self._chunks.get(timeout=0.2)
        except queue.Empty:
            return b""

    @property
    def alive(self) -> bool:
        if self._dom is None:
            return False
        try:
            return bool(self._dom.isActive())
        except Exception:  # a transient domain that stopped no longer exists
            return False

    @property
    def pid(self) -> int | None:
        """QEMU's pid where libvirt's run files are on this machine."""
        try:
            return int(Path(f"/run/libvirt/qemu/{self.domain_name}.pid").read_text())
        except (OSError, ValueError):
            return None

    @property
    def exit_code(self) -> int | None:
        if self._dom is None or self.alive:
            return None
        return -9 if self._destroyed else 0

    def suspend(self) -> None:
        self._dom.suspend()

    def resume(self) -> None:
        self._dom.resume()

    def qmp(self, cmd: str, **args: object) -> object:
        raise NotSupported(f"{self.name}: libvirt owns this guest's QMP monitor")

    def _quit(self) -> None:
        pass  # no monitor of ours: the destroy in _shutdown is the power cut

    def _shutdown(self) -> None:
        try:
            if self.alive:
                self._destroyed = True
                try:
                    self._dom.destroy()
                except Exception:  # it stopped by itself in the meantime
                    pass
        finally:
            self._post_shutdown()

    def _post_shutdown(self) -> None:
        if self._stream is not None:  # ends the console reader VM's cleanup joins
            self._console_end(self._stream)
            try:
                self._stream.abort()
            except Exception:  # already ended with the domain
                pass
            self._stream = None
        super()._post_shutdown()
        for link in self._shm_links:
            link.unlink(missing_ok=True)
        if self._conn is not None:
            self._conn.close()  # AUTODESTROY: a domain still there goes with it
            self._conn = None
