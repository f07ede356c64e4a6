"""One QEMU guest: launch, console, QMP, shutdown.

A VM is a context manager. The serial console is read through pexpect by a
thread that drains it continuously (a full pty would stall the guest), keeps
a log and wakes whoever waits for a line. Shutdown is graceful first (the
guest powers itself off when its script ends), then QMP `quit`, then SIGKILL;
it always runs. QEMU gets a parent-death signal, so it dies with the harness
even when the harness is SIGKILLed."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

import pexpect

from harness.errors import BootTimeout, LaunchError
from harness.procs import die_with_parent
from harness.vm.qemu import MachineConfig, command

READY_RE = re.compile(rb"DH-READY (\S+)")
RUN_RE = re.compile(rb"DH-RUN ([0-9.]+)")  # init is about to run the script (guest uptime)
EXIT_RE = re.compile(rb"DH-EXIT (\d+)")
_KEEP = 1 << 20  # console bytes kept in memory for matching and error messages


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
        self._qmp = None

    @property
    def name(self) -> str:
        return self.cfg.name

    # ---- launch ----------------------------------------------------------

    def launch(self, port_timeout: float = 10.0) -> VM:
        """Starts QEMU. Call from a thread that outlives the VM: the
        parent-death signal fires when the forking thread exits."""
        for p in [self.cfg.qmp_socket, *(self.cfg.port_socket(x) for x in self.cfg.ports)]:
            p.unlink(missing_ok=True)
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
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
        deadline = time.monotonic() + port_timeout
        for port in self.cfg.ports:
            self.ports[port] = self._connect(self.cfg.port_socket(port), deadline)
        return self

    def _connect(self, path: Path, deadline: float) -> socket.socket:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return s
            except OSError:
                s.close()
            if not self.alive:
                raise self._died(f"before its socket {path.name} appeared")
            if time.monotonic() > deadline:
                raise LaunchError(f"{self.name}: QEMU did not create {path} in time",
                                  cmdline=self.cmdline, console=self.console_tail())
            time.sleep(0.005)

    def _drain(self) -> None:
        assert self.child is not None
        with open(self.cfg.console_log, "ab") as log:
            while True:
                try:
                    data = self.child.read_nonblocking(65536, timeout=0.2)
                except pexpect.TIMEOUT:
                    continue
                except (pexpect.EOF, OSError):
                    break
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

    def _died(self, when: str) -> LaunchError:
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
        raise self._died(f"before {what}")

    def wait(self, timeout: float) -> int | None:
        """Waits for QEMU to exit; its exit code, or None if it is still up."""
        deadline = time.monotonic() + timeout
        while self.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.exit_code

    # ---- QMP -------------------------------------------------------------

    def qmp(self, cmd: str, **args: object) -> object:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        if self._qmp is None:
            deadline = time.monotonic() + 10.0  # QEMU makes the socket as it starts
            while not self.cfg.qmp_socket.exists() and self.alive:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            q = QEMUMonitorProtocol(str(self.cfg.qmp_socket))
            q.settimeout(5.0)
            try:
                q.connect()
            except Exception as exc:  # qemu.qmp raises its own tree; report it as ours
                raise LaunchError(f"{self.name}: cannot reach QMP at {self.cfg.qmp_socket}: "
                                  f"{exc}", cmdline=self.cmdline) from exc
            self._qmp = q
        return self._qmp.cmd(cmd, **args)

    # ---- stop ------------------------------------------------------------

    def stop(self, grace: float = 0.0) -> int | None:
        """Waits up to `grace` for the guest to power off by itself, then QMP
        quit, then SIGKILL. Always leaves QEMU gone."""
        if self.child is None:
            return None
        if self.alive and grace > 0:
            self.wait(grace)
        if self.alive:
            try:
                self.qmp("quit")
            except Exception:  # whatever QMP says, SIGKILL follows
                pass
            self.wait(3.0)
        if self.alive:
            self.child.terminate(force=True)
            self.wait(5.0)
        for s in self.ports.values():
            s.close()
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception:  # the peer is gone; nothing to close cleanly
                pass
            self._qmp = None
        if self._reader is not None:
            self._reader.join(2.0)
        try:
            self.child.close(force=True)
        except pexpect.ExceptionPexpect:
            pass
        return self.exit_code

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
