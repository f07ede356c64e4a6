"""One QEMU guest: launch, console, QMP, shutdown.

The life cycle has QEMU's own shape (python/qemu/machine): launch() runs
_pre_launch (the sockets QEMU will connect to), _launch (QEMU and the console
reader) and _post_launch (QEMU's connections accepted); when any step fails,
the VM is shut down before the error goes up. _post_shutdown runs after every
shutdown, of a running VM or of a failed launch: it closes what the VM holds
and removes its sockets.

The VM owns its sockets: it listens on each before QEMU starts, and QEMU's
chardevs (the virtio-serial ports, QMP) connect to them, so launch accepts
connections instead of waiting for files to appear. The serial console is
read through pexpect by a thread that drains it continuously (a full pty
would stall the guest), keeps a log and wakes whoever waits for a line.
Shutdown is graceful first (the guest powers itself off when its script
ends), then QMP `quit`, then SIGKILL; it always runs. QEMU gets a
parent-death signal, so it dies with the harness even when the harness is
SIGKILLed."""

from __future__ import annotations

import os
import re
import select
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pexpect

from harness.errors import BootTimeout, LaunchError
from harness.procs import die_with_parent
from harness.vm.qemu import MachineConfig, command

if TYPE_CHECKING:  # loaded on first QMP use: a guest that powers itself off needs none
    import asyncio

    from qemu.qmp import QMPClient

RUN_RE = re.compile(rb"DH-RUN ([0-9.]+)")  # init is about to run the script (guest uptime)
EXIT_RE = re.compile(rb"DH-EXIT (\d+)")
_KEEP = 1 << 20  # console bytes kept in memory for matching and error messages
QMP_TIMEOUT = 5.0


class VM:
    def __init__(self, cfg: MachineConfig) -> None:
        self.cfg = cfg
        self.cmdline = command(cfg)
        self.child: pexpect.spawn | None = None
        self.ports: dict[str, socket.socket] = {}
        self.launched_at: float | None = None
        self._console = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._reader: threading.Thread | None = None
        self._listeners: dict[Path, socket.socket] = {}
        self._qmp_sock: socket.socket | None = None
        self._qmp: QMPClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # QMP's, used under _qmp_lock
        self._qmp_lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.cfg.name

    # ---- launch ----------------------------------------------------------

    def launch(self, timeout: float = 10.0) -> VM:
        """Starts QEMU and accepts its connections within timeout. Call from
        a thread that outlives the VM: the parent-death signal fires when
        the forking thread exits. If it fails, QEMU is gone and everything
        is cleaned up before the error is raised."""
        if self.child is not None:
            raise LaunchError(f"{self.name}: already launched", cmdline=self.cmdline)
        try:
            self._pre_launch()
            self._launch()
            self._post_launch(time.monotonic() + timeout)
        except BaseException:
            self._shutdown()
            raise
        return self

    def _sockets(self) -> list[Path]:
        """The sockets QEMU connects to: the ports, then QMP."""
        return [*(self.cfg.port_socket(p) for p in self.cfg.ports), self.cfg.qmp_socket]

    def _pre_launch(self) -> None:
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        for path in self._sockets():
            path.unlink(missing_ok=True)  # left by an earlier VM of this name
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listeners[path] = s  # before bind: post-shutdown closes and removes it
            s.bind(str(path))
            s.listen(1)

    def _launch(self) -> None:
        me = os.getpid()
        try:
            self.child = pexpect.spawn(self.cmdline[0], self.cmdline[1:], echo=False,
                                       timeout=None, env=dict(os.environ),
                                       preexec_fn=lambda: die_with_parent(me))
        except pexpect.ExceptionPexpect as exc:
            raise LaunchError(f"{self.name}: could not start QEMU: {exc}",
                              cmdline=self.cmdline) from exc
        self.launched_at = time.monotonic()
        self._reader = threading.Thread(target=self._drain, name=f"console-{self.name}",
                                        daemon=True)
        self._reader.start()

    def _post_launch(self, deadline: float) -> None:
        for port in self.cfg.ports:
            self.ports[port] = self._accept(self.cfg.port_socket(port), deadline)
        self._qmp_sock = self._accept(self.cfg.qmp_socket, deadline)  # QEMU's last chardev

    def _accept(self, path: Path, deadline: float) -> socket.socket:
        """QEMU's connection to one of our sockets; the socket file goes as
        soon as it has come (nothing else may connect)."""
        listener = self._listeners.pop(path)
        try:
            while not select.select([listener], [], [], 0.05)[0]:
                if not self.alive:
                    raise self.died(f"before it connected to {path.name}")
                if time.monotonic() > deadline:
                    raise LaunchError(f"{self.name}: QEMU did not connect to {path} in time",
                                      cmdline=self.cmdline, console=self.console_tail())
            return listener.accept()[0]
        finally:
            listener.close()
            path.unlink(missing_ok=True)

    def _console_read(self) -> bytes | None:
        """The console's next bytes (b"" if none came for a while), None at its end."""
        assert self.child is not None
        try:
            return self.child.read_nonblocking(65536, timeout=0.2)
        except pexpect.TIMEOUT:
            return b""
        except (pexpect.EOF, OSError):
            return None

    def _drain(self) -> None:
        with open(self.cfg.console_log, "ab") as log:
            while True:
                data = self._console_read()
                if data is None:
                    break
                if not data:
                    continue
                log.write(data)
                log.flush()
                with self._cond:
                    self._console += data
                    if len(self._console) > 2 * _KEEP:
                        del self._console[:-_KEEP]
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    # ---- state -----------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.isalive()

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    @property
    def exit_code(self) -> int | None:
        if self.child is None or self.child.isalive():
            return None
        sig = self.child.signalstatus
        return -sig if sig else self.child.exitstatus

    def console_tail(self, lines: int = 30) -> str:
        with self._cond:
            text = bytes(self._console[-16384:]).decode(errors="replace")
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])

    def died(self, when: str) -> LaunchError:
        """The error for a QEMU that exited `when` (it is waited for)."""
        self.wait(2.0)
        tail = self.console_tail()
        hint = ""
        if not tail.strip() or "kernel" in tail.lower() or "initrd" in tail.lower():
            hint = ("; if the kernel or initramfs is damaged, `harness images build --force` "
                    "rebuilds them, and `harness doctor` checks QEMU")
        return LaunchError(f"{self.name}: QEMU exited with status {self.exit_code} {when}{hint}",
                           cmdline=self.cmdline, exit_code=self.exit_code, console=tail)

    # ---- waiting ---------------------------------------------------------

    def console_has(self, pattern: re.Pattern[bytes]) -> bool:
        with self._cond:
            return pattern.search(self._console) is not None

    def wait_for(self, pattern: re.Pattern[bytes], timeout: float, what: str) -> re.Match[bytes]:
        """Waits for a console line; BootTimeout (with the console) if it
        does not come, LaunchError if QEMU exits first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = pattern.search(self._console)
                if m:
                    return m
                if self._eof:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BootTimeout(
                        f"{self.name}: no {what} on the console within {timeout:g} s; "
                        f"the console ends:\n{self.console_tail()}",
                        console=self.console_tail())
                self._cond.wait(min(left, 0.5))
        raise self.died(f"before {what}")

    def wait(self, timeout: float) -> int | None:
        """Waits for QEMU to exit; its exit code, or None if it is still up."""
        deadline = time.monotonic() + timeout
        while self.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.exit_code

    # ---- QMP -------------------------------------------------------------

    def qmp(self, cmd: str, **args: object) -> object:
        """A QMP command's return value; qemu.qmp's ExecuteError if QEMU
        refuses it, TimeoutError after QMP_TIMEOUT. The session starts on
        first use, over the connection launch accepted."""
        with self._qmp_lock:
            if self._qmp is None:
                self._qmp_connect()
            assert self._qmp is not None
            return self._qmp_run(self._qmp.execute(cmd, args or None))

    def qmp_fd(self, name: str, fd: int) -> None:
        """Hands QEMU a file descriptor under a name (QMP getfd), e.g. for
        `migrate fd:NAME`: QEMU's sandbox lets it open nothing itself."""
        with self._qmp_lock:
            if self._qmp is None:
                self._qmp_connect()
            assert self._qmp is not None
            self._qmp.send_fd_scm(fd)
            self._qmp_run(self._qmp.execute("getfd", {"fdname": name}))

    def _qmp_connect(self) -> None:
        if self._qmp_sock is None:
            raise LaunchError(f"{self.name}: no QMP connection (QEMU is not running)",
                              cmdline=self.cmdline)
        import asyncio

        from qemu.qmp import QMPClient

        self._loop = asyncio.new_event_loop()
        client = QMPClient(self.name)
        try:
            self._qmp_run(client.connect(self._qmp_sock))
        except Exception as exc:  # qemu.qmp raises its own tree; report it as ours
            raise LaunchError(f"{self.name}: QMP did not answer: {exc!r}",
                              cmdline=self.cmdline) from exc
        self._qmp = client

    def _qmp_run(self, step):
        import asyncio

        assert self._loop is not None
        return self._loop.run_until_complete(asyncio.wait_for(step, QMP_TIMEOUT))

    def _close_qmp(self) -> None:
        with self._qmp_lock:
            if self._qmp is not None:
                try:
                    self._qmp_run(self._qmp.disconnect())
                except Exception:  # the peer is gone; nothing to close cleanly
                    pass
                self._qmp = None
            if self._loop is not None:
                self._loop.close()
                self._loop = None
            if self._qmp_sock is not None:
                self._qmp_sock.close()
                self._qmp_sock = None

    # ---- stop ------------------------------------------------------------

    def stop(self, grace: float = 0.0) -> int | None:
        """Waits up to `grace` for the guest to power off by itself, then QMP
        quit, then SIGKILL. Always leaves QEMU gone and runs post-shutdown."""
        try:
            if self.alive and grace > 0:
                self.wait(grace)
            if self.alive:
                self._quit()
        finally:
            self._shutdown()
        return self.exit_code

    def _quit(self) -> None:
        """Asks QEMU to exit, and gives it a moment before the SIGKILL."""
        try:
            self.qmp("quit")
        except Exception:  # whatever QMP says, SIGKILL follows
            pass
        self.wait(3.0)

    def _shutdown(self) -> None:
        """SIGKILL if QEMU is still there, then post-shutdown."""
        try:
            if self.alive:
                assert self.child is not None
                self.child.terminate(force=True)
                self.wait(5.0)
        finally:
            self._post_shutdown()

    def _post_shutdown(self) -> None:
        """Closes what the VM holds and removes its sockets; safe to repeat."""
        for s in self.ports.values():
            s.close()
        self._close_qmp()
        for path, s in self._listeners.items():
            s.close()
            path.unlink(missing_ok=True)
        self._listeners.clear()
        if self._reader is not None:
            self._reader.join(2.0)
        if self.child is not None:
            try:
                self.child.close(force=True)
            except pexpect.ExceptionPexpect:
                pass

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
