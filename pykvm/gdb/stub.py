"""The gdb stub: a GDB remote-protocol server that holds and releases the VM's vCPUs.

    stub = GdbStub(machine, address=("127.0.0.1", 1234), wait=True)
    stub.start()             # listens now (GdbError if the port is busy); gdb may attach any time
    machine.run()            # vCPU threads stop and go as gdb says
    stub.close()

This file is the server: the listening socket, one gdb session at a time, and the packet loop that
turns gdb's bytes into commands and the vCPUs' stops into stop replies. The rest, by concern:
- packets.py      framing ($...#cs, acks, escapes, Ctrl-C)
- commands.py     each command and its reply
- vcpus.py        holding and releasing the vCPUs, KVM_SET_GUEST_DEBUG, the exits that stop them
- breakpoints.py  int3s in guest memory and the debug registers
- usertraps.py    KVM-PVM: user-mode (CPL3) breakpoints and steps caught in the guest's handlers
- memory.py       guest memory by linear (virtual) or physical address
"""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
import threading
from collections.abc import Callable

from ..stop import Stop
from . import registers as R
from .address import GdbError, parse_address
from .breakpoints import Breakpoints
from .commands import DETACH, Commands
from .memory import LinearMemory
from .packets import PacketReader, frame
from .usertraps import UserTraps
from .vcpus import VcpuControl


class GdbStub:
    """gdb's view of `machine`'s vCPUs.

    vcpus: the vCPUs to offer (default: machine.vcpus, else [machine.vcpu]). arch: "i386:x86-64"
    or "i386" (pykvm.gdb.registers). wait: hold the vCPUs before their first instruction until
    gdb attaches and continues. host_kind: pykvm.pvm.host_kind() (decides how breakpoints are
    found, pykvm/gdb/vcpus.py). log: where one-line notices go (default: stderr).
    early_translate: a fallback for linear addresses the current page tables do not map yet
    (pykvm/gdb/memory.py; pykvm.gdb.linux_text_mapping). user_traps: catch CPL3 breakpoints and
    steps in the guest's own #BP/#DB handlers (pykvm/gdb/usertraps.py); default: on KVM-PVM hosts
    for x86-64 guests (pass False for Linux, whose userland cannot run there)."""

    def __init__(self, machine, *, vcpus: list | None = None,
                 address: tuple[str, int] = ("127.0.0.1", 1234), arch: str = "i386:x86-64",
                 wait: bool = False, host_kind: str | None = None,
                 log: Callable[[str], None] | None = None,
                 early_translate: Callable[[int], int | None] | None = None,
                 user_traps: bool | None = None):
        self.machine = machine
        self.address = address
        self.arch = arch
        self.regs = R.registers(arch)
        self.xml = R.target_xml(arch).encode()
        self.wait = wait
        if host_kind is None:
            from ..pvm import host_kind as detect
            host_kind = detect()
        pvm = host_kind == "KVM-PVM"
        self.log = log or (lambda msg: print(f"pykvm: gdb: {msg}", file=sys.stderr, flush=True))
        lock = threading.Condition()
        self.memory = LinearMemory(machine.mem, early_translate)
        # int3s are planted where the first vCPU's page tables say (all vCPUs share one kernel).
        self.breakpoints = Breakpoints(
            machine.mem, lambda addr: self.memory.translate(self.control.cpus[0], addr), lock,
            pvm=pvm, log=lambda msg: self.log(msg))
        vcpus = vcpus or getattr(machine, "vcpus", None) or [machine.vcpu]
        if user_traps is None:
            user_traps = pvm and arch == "i386:x86-64"
        self.control = VcpuControl(machine, vcpus, self.breakpoints, lock, pvm=pvm,
                                   wakeup=self._wakeup,
                                   user_traps=UserTraps(self.memory) if user_traps else None)
        self.cpus = self.control.cpus
        self.commands = Commands(self)
        self.last_stop = f"T05thread:{self.cpus[0].tid:x};"
        self._vm_stop: Stop | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._conn: socket.socket | None = None    # gdb's connection while a session lasts
        self.connected = threading.Event()  # a gdb has attached (tests, examples)
        self.resumed = threading.Event()    # gdb let the vCPUs run (set at each resume)

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        try:
            family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
            sock = socket.create_server(self.address, family=family, reuse_port=False)
        except OSError as e:
            host, port = self.address
            reason = (e.strerror or str(e)).split(" (while attempting")[0]
            if e.errno == errno.EADDRINUSE:
                raise GdbError(f"--gdb: port {port} on {host} is in use; pick another with "
                               f"--gdb tcp::PORT") from None
            # getaddrinfo's EAI_* codes are negative: the host name did not resolve
            if isinstance(e, socket.gaierror) or (e.errno or 0) < 0 \
                    or e.errno == errno.EADDRNOTAVAIL:
                raise GdbError(f"--gdb: cannot listen on {host!r}: {reason} (an address of this "
                               f"machine, e.g. tcp::{port} for 127.0.0.1)") from None
            raise GdbError(f"--gdb: port {port} on {host} cannot be used ({reason})") from None
        self._sock = sock
        m, c = self.machine, self.control
        m.debug_handler = c.on_debug
        m.interrupted_handlers.append(c.on_interrupted)
        m.internal_error_handlers.insert(0, c.on_internal_error)
        m.on_stop.append(self._on_machine_stop)
        m.on_close.append(self.close)         # gdb's session ends before memory and vCPUs go
        if self.wait:
            c.hold_all()
        self._thread = threading.Thread(target=self._serve, name="pykvm-gdb", daemon=True)
        self._thread.start()
        host, port = sock.getsockname()[:2]
        self.log(f"listening on {host}:{port}" + (" (vCPUs held until gdb continues)"
                                                  if self.wait else ""))

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    def close(self) -> None:
        """Stop listening and end gdb's session. Returns once the session's thread has ended,
        so its last act - restoring guest code under its int3s, letting the vCPUs go - never
        meets a closed machine (Machine.close calls this first). gdb gets two seconds to take the
        guest's exit ("W" packet) and disconnect; after that its connection is shut."""
        self._closing = True
        self._wakeup()
        if self._sock is not None:
            self._sock.close()
        self.control.let_go()
        if self._thread is None or self._thread is threading.current_thread():
            return
        self._thread.join(2)
        conn = self._conn
        if self._thread.is_alive() and conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)   # the session's recv() sees the end
            except OSError:
                pass
        self._thread.join(10)

    def _wakeup(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def _on_machine_stop(self, stop: Stop) -> None:
        self._vm_stop = stop
        self._wakeup()

    def release(self, actions: dict) -> None:
        """Let the vCPUs run as gdb said (commands.py's c/s/vCont)."""
        self.control.release(actions)
        self.resumed.set()

    # ------------------------------------------------------------ the connection
    def _serve(self) -> None:
        while not self._closing:
            try:
                r, _, _ = select.select([self._sock, self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._wake_r in r:
                os.read(self._wake_r, 4096)
            if self._sock in r and not self._closing:
                try:
                    conn, peer = self._sock.accept()
                except OSError:
                    return
                self.log(f"gdb attached from {peer[0]}:{peer[1]}")
                self.connected.set()
                self._conn = conn
                try:
                    self._session(conn)
                except OSError:
                    pass
                finally:
                    self._conn = None
                    conn.close()
                    self.control.detach()
                    self.log("gdb detached; the guest runs on")
            if self._vm_stop is not None:
                return

    def _stop_reply(self) -> str | None:
        """Once every vCPU is held after a stop: the reply gdb is waiting for (GDB manual E.3,
        "Stop Reply Packets": T signal, the thread, why)."""
        event = self.control.stopped(self.commands.g_cpu)
        if event is None:
            return None
        self.commands.g_cpu = self.commands.c_cpu = event.cpu
        self.last_stop = f"T{event.signal:02x}thread:{event.cpu.tid:x};{event.extra}"
        return self.last_stop

    def _session(self, conn: socket.socket) -> None:
        reader = PacketReader()
        control = self.control
        self.commands.noack = False
        if self._vm_stop is None:             # gdb sees a stopped target when it attaches
            control.hold_all()
            control.wait_all_parked(lambda: self._vm_stop is not None)
        control.running = False

        trace = self.log if os.environ.get("PYKVM_GDB_TRACE") else None

        def send(payload: str | bytes) -> None:
            if trace:
                trace(f"-> {payload[:200]!r}")
            conn.sendall(frame(payload))

        while True:
            if self._vm_stop is not None:     # the guest ended: "W" with its exit status
                status = self._vm_stop.status if self._vm_stop.status is not None else 0
                send(f"W{status & 0xFF:02x}")
                return
            if control.running:
                reply = self._stop_reply()
                if reply is not None:
                    control.running = False
                    send(reply)
            r, _, _ = select.select([conn, self._wake_r], [], [])
            if self._wake_r in r:
                os.read(self._wake_r, 4096)
            if conn not in r:
                continue
            data = conn.recv(65536)
            if not data:
                return
            for kind, payload in reader.feed(data):
                if trace:
                    trace(f"<- {kind} {payload[:200]!r}" if payload else f"<- {kind}")
                if kind == "interrupt":
                    if control.running:
                        control.hold_all(interrupt=True)
                    continue
                if kind == "ack":
                    continue
                if kind == "bad":
                    conn.sendall(b"-")
                    continue
                if not self.commands.noack:
                    conn.sendall(b"+")
                reply = self.commands.reply(payload.decode("latin-1"), payload)
                if reply == DETACH:
                    send("OK")
                    return
                if reply is not None:
                    send(reply)


__all__ = ["GdbStub", "GdbError", "parse_address"]
