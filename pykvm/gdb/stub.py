"""The gdb stub: a GDB remote-protocol server that holds and releases the VM's vCPUs.

    stub = GdbStub(machine, address=("127.0.0.1", 1234), wait=True)
    stub.start()             # listens now (GdbError if the port is busy); gdb may attach any time
    machine.run()            # vCPU threads stop and go as gdb says
    stub.close()

All-stop mode, as gdb expects by default: when one vCPU stops (breakpoint, finished step, Ctrl-C),
the others are kicked out of KVM_RUN and held too before gdb hears of it; `c`/`vCont` releases
them. A vCPU is "held" inside the run loop's exit handler, in its own thread, waiting on a
condition: registers and memory are then read from the stub's thread while no KVM_RUN is active.
Each vCPU is a gdb thread (id = vCPU index + 1).

How the CPU is made to stop (KVM_SET_GUEST_DEBUG, Documentation/virt/kvm/api.rst):
- single-step: KVM_GUESTDBG_SINGLESTEP, a `Debug` exit (#DB, exception 1) after one instruction;
  KVM_GUESTDBG_BLOCKIRQ keeps an interrupt from being taken inside the step where KVM has it.
- software breakpoints: gdb sends Z0 with an address; the stub writes `int3` (0xcc) there while
  the guest runs and restores the byte whenever it stops (so gdb always reads the true code).
  With KVM_GUESTDBG_USE_SW_BP, KVM intercepts the #BP and exits with `Debug` (exception 3) and
  RIP still on the int3, which the stub reports as `swbreak` at that address. An int3 the stub did
  not plant is the guest's own: it is given back with KVM_GUESTDBG_INJECT_BP.
- KVM-PVM hosts (HOST-KVM.md): CPL0 code is emulated and the emulator knows no int3, so KVM_RUN
  ends with an emulation-failure internal error at the int3 - the stub takes those at its own
  breakpoints as hits. In real mode that emulator *does* run int3 (through the IVT), so there the
  stub continues by single-stepping and compares each new PC with the breakpoints instead, until
  the guest leaves real mode. Guest code at CPL3 runs natively there and its #DB/#BP go to the
  guest's own IDT, so stepping and breakpoints in user mode do not reach the stub on such hosts.
- hardware breakpoints and watchpoints (Z1-Z4): the CPU's debug registers, DR0-DR3 holding up to
  four addresses and DR7 saying what each watches (SDM Vol. 3B, 18.2 "Debug registers": L0-L3
  enable bits, R/W0-3 00 execute / 01 write / 11 read or write, LEN0-3 1, 2, 8 or 4 bytes), given
  to KVM with KVM_GUESTDBG_USE_HW_BP; a hit is a `Debug` exit (#DB) whose DR6 bits 0-3 name the
  slot. x86 KVM always offers the four (KVM_CAP_GUEST_DEBUG_HW_BPS is an arm64 capability and
  reads 0 on every x86 host; QEMU uses the four unconditionally too). On KVM-PVM, measured here:
  execution breakpoints fire in CPL0 code (KVM's instruction emulator checks DR7 before each
  instruction) but a data watchpoint never does, so the stub refuses Z2-Z4 there (empty reply:
  gdb falls back to software watchpoints, which single-step) and says why once.
- Ctrl-C in gdb (byte 0x03): every vCPU is kicked and held; the stop is reported as SIGINT.

Memory (m/M/X) is addressed as gdb addresses it - linear (virtual) addresses, translated through
the current page tables of the selected vCPU with KVM_TRANSLATE (paging off: linear = physical).
`monitor phys on` or QEMU's `maintenance packet Qqemu.PhyMemMode:1` switches to guest-physical
addresses.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from ..stop import Stop, StopReason
from . import registers as R
from .debugregs import HwPoint, WATCH_REPLY, dr7_for, valid_point
from .packets import PacketReader, frame

SIGINT, SIGTRAP = 2, 5
INT3 = 0xCC
CR0_PE = 1 << 0
CR0_PG = 1 << 31
PAGE = 0x1000


class GdbError(Exception):
    """A --gdb setting that cannot be used (bad address, busy port); one line."""


def parse_address(text: str) -> tuple[str, int]:
    """QEMU's `tcp::1234` / `tcp:HOST:1234`, or `HOST:PORT`, `:PORT`, `PORT`. An empty host is
    127.0.0.1: the stub gives full control of the guest, so it listens on loopback unless told."""
    spec = text[4:] if text.startswith("tcp:") else text
    host, _, port = spec.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise GdbError(f"--gdb {text!r}: expected tcp::PORT or tcp:HOST:PORT (e.g. tcp::1234)") from None
    if not 0 < number < 65536:
        raise GdbError(f"--gdb {text!r}: port {number} is not a TCP port (1-65535)")
    return host or "127.0.0.1", number


@dataclass(eq=False)
class _Cpu:
    vcpu: object
    tid: int
    parked: bool = False
    action: str | None = None           # "c" or "s": what to do when released
    mode: str = "run"                   # while running: "run", "step", "step-to-bp"
    control: int = -1                   # the guest-debug control last set (-1: never)
    debugreg: tuple = ()                # and the debug registers given with it
    inject_bp: bool = False
    regs: R.RegisterFile | None = None


@dataclass
class _Event:
    cpu: _Cpu
    signal: int
    extra: str = ""                     # e.g. "swbreak:;"


@dataclass
class _Breakpoint:
    addr: int                           # linear, as gdb gave it
    phys: int | None = None             # where the int3 is while planted
    saved: bytes = b""


class GdbStub:
    """gdb's view of `machine`'s vCPUs (see the module docstring).

    vcpus: the vCPUs to offer (default: machine.vcpus, else [machine.vcpu]). arch: "i386:x86-64"
    or "i386" (pykvm.gdb.registers). wait: hold the vCPUs before their first instruction until
    gdb attaches and continues. host_kind: pykvm.pvm.host_kind() (decides the real-mode way of
    continuing). log: where one-line notices go (default: stderr). early_translate: a fallback
    for linear addresses the current page tables do not map yet - a kernel's own virtual
    addresses before it has switched to its page tables (pykvm.gdb.linux_text_mapping), so that
    `break start_kernel` can be planted at the first instruction."""

    def __init__(self, machine, *, vcpus: list | None = None,
                 address: tuple[str, int] = ("127.0.0.1", 1234), arch: str = "i386:x86-64",
                 wait: bool = False, host_kind: str | None = None,
                 log: Callable[[str], None] | None = None,
                 early_translate: Callable[[int], int | None] | None = None):
        from ..kvm import headers as lib     # KVM_GUESTDBG_* from <linux/kvm.h>, via the binding
        self._lib = lib
        self.machine = machine
        vcpus = vcpus or getattr(machine, "vcpus", None) or [machine.vcpu]
        self.cpus = [_Cpu(v, i + 1) for i, v in enumerate(vcpus)]
        self.address = address
        self.arch = arch
        self.regs = R.registers(arch)
        self.xml = R.target_xml(arch).encode()
        self.wait = wait
        self.early_translate = early_translate
        if host_kind is None:
            from ..pvm import host_kind as detect
            host_kind = detect()
        self.pvm = host_kind == "KVM-PVM"
        self.log = log or (lambda msg: print(f"pykvm: gdb: {msg}", file=sys.stderr, flush=True))
        self.hw_bps = 4                     # DR0-DR3 (see the module docstring)
        self._cv = threading.Condition()
        self._pause = False                 # held: vCPUs park at their next exit
        self._events: list[_Event] = []
        self._bps: dict[int, _Breakpoint] = {}
        self._hw: list[HwPoint | None] = [None] * 4
        self._planted = False
        self._phys_mode = False
        self._g_cpu = self.cpus[0]
        self._c_cpu = self.cpus[0]
        self._last_stop = f"T05thread:{self.cpus[0].tid:x};"
        self._running = False               # gdb is waiting for a stop reply
        self._interrupted = False           # gdb sent Ctrl-C while running
        self._vm_stop: Stop | None = None
        self._told_hw = False
        self._wake_r, self._wake_w = os.pipe()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self.connected = threading.Event()  # a gdb has attached (tests, examples)
        self.resumed = threading.Event()    # gdb let the vCPUs run (set at each resume)

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        try:
            sock = socket.create_server(self.address, reuse_port=False)
        except OSError as e:
            host, port = self.address
            why = "is in use" if e.errno == 98 else f"cannot be used ({e.strerror})"
            raise GdbError(f"--gdb: port {port} on {host} {why}; pick another with "
                           f"--gdb tcp::PORT") from None
        self._sock = sock
        m = self.machine
        m.debug_handler = self._on_debug
        m.interrupted_handlers.append(self._on_interrupted)
        m.internal_error_handlers.insert(0, self._on_internal_error)
        m.on_stop.append(self._on_machine_stop)
        if self.wait:
            self._hold_all()
        self._thread = threading.Thread(target=self._serve, name="pykvm-gdb", daemon=True)
        self._thread.start()
        host, port = sock.getsockname()[:2]
        self.log(f"listening on {host}:{port}" + (" (vCPUs held until gdb continues)"
                                                  if self.wait else ""))

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    def close(self) -> None:
        self._closing = True
        self._wakeup()
        if self._sock is not None:
            self._sock.close()
        with self._cv:
            self._pause = False
            for cpu in self.cpus:
                if cpu.parked:
                    cpu.action = cpu.action or "c"
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(2)

    def _wakeup(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    # ------------------------------------------------------------ the vCPU side (vCPU threads)
    def _current(self) -> _Cpu | None:
        me = threading.get_ident()
        for cpu in self.cpus:
            if cpu.vcpu.thread_id == me:
                return cpu
        return self.cpus[0] if len(self.cpus) == 1 else None

    def _park(self, cpu: _Cpu, event: _Event | None) -> None:
        """Hold this vCPU (we are in its thread) until gdb releases it or the VM is stopping."""
        with self._cv:
            if event is not None:
                self._events.append(event)
                self._pause = True
            cpu.parked = True
            self._cv.notify_all()
            self._wakeup()
            while cpu.action is None and not self.machine.stop_requested and not self._closing:
                self._cv.wait(0.25)
            action, cpu.action = cpu.action or "c", None
            cpu.parked = False
        if not self.machine.stop_requested:
            self._resume_cpu(cpu, action)

    def _stop_all(self, cpu: _Cpu, event: _Event) -> None:
        with self._cv:
            self._pause = True
        for other in self.cpus:
            if other is not cpu:
                other.vcpu.kick()
        self._park(cpu, event)

    def _resume_cpu(self, cpu: _Cpu, action: str) -> None:
        """Set the vCPU's guest-debug mode for `action` (in its own thread, before KVM_RUN)."""
        lib = self._lib
        control = 0
        if action == "s":
            cpu.mode = "step"
            control = lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP | lib.KVM_GUESTDBG_BLOCKIRQ
        elif self._bps and not self._planted:
            cpu.mode = "step-to-bp"        # real mode on KVM-PVM: see the module docstring
            control = lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP
        else:
            cpu.mode = "run"
            if self._bps:
                control = lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_SW_BP
        if cpu.inject_bp:
            control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_INJECT_BP
            cpu.inject_bp = False
        debugreg = ()
        if any(self._hw):
            control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP
            debugreg = tuple(p.addr if p else 0 for p in self._hw) + (0, 0, 0, dr7_for(self._hw))
        self._set_debug(cpu, control, debugreg)

    def _set_debug(self, cpu: _Cpu, control: int, debugreg: tuple = ()) -> None:
        if (control, debugreg) == (cpu.control, cpu.debugreg) \
                and not control & self._lib.KVM_GUESTDBG_INJECT_BP:
            return
        try:
            cpu.vcpu.set_guest_debug(control, debugreg)
        except OSError:
            # KVM_GUESTDBG_BLOCKIRQ is Linux 5.16+: older KVMs refuse the unknown bit.
            control &= ~self._lib.KVM_GUESTDBG_BLOCKIRQ
            cpu.vcpu.set_guest_debug(control, debugreg)
        cpu.control = control
        cpu.debugreg = debugreg

    def _on_interrupted(self, machine) -> None:
        if not self._pause:
            return
        cpu = self._current()
        if cpu is not None:
            self._park(cpu, None)

    def _on_debug(self, machine, e) -> Stop | None:
        cpu = self._current()
        if cpu is None:
            return Stop(StopReason.ERROR, message=f"debug exit on a vCPU the gdb stub does not hold: {e!r}")
        rf = R.RegisterFile(cpu.vcpu)
        pc = rf.linear_pc
        if e.exception == 3:                 # #BP: an int3 ran
            if pc in self._bps:
                self._stop_all(cpu, _Event(cpu, SIGTRAP, "swbreak:;"))
            else:                            # the guest's own int3: give it back
                cpu.inject_bp = True
                self._resume_cpu(cpu, "c" if cpu.mode != "step" else "s")
            return None
        hit = next((i for i in range(4) if e.dr6 & (1 << i) and self._hw[i] is not None), None)
        if hit is not None:                  # a debug-register breakpoint or watchpoint
            p = self._hw[hit]
            extra = "hwbreak:;" if p.kind == 1 else f"{WATCH_REPLY[p.kind]}:{p.addr:x};"
            self._stop_all(cpu, _Event(cpu, SIGTRAP, extra))
        elif cpu.mode == "step":
            self._stop_all(cpu, _Event(cpu, SIGTRAP))
        elif cpu.mode == "step-to-bp":
            if pc in self._bps:
                self._stop_all(cpu, _Event(cpu, SIGTRAP, "swbreak:;"))
            elif rf.sregs.cr0 & CR0_PE:      # out of real mode: plant the int3s and run freely
                with self._cv:
                    self._plant()
                self._resume_cpu(cpu, "c")
        else:                                # a #DB we did not ask for (hardware breakpoint?)
            self._stop_all(cpu, _Event(cpu, SIGTRAP))
        return None

    def _on_internal_error(self, machine, e) -> bool:
        """KVM-PVM: an int3 at CPL0 is an emulation failure with RIP on it. Ours: a breakpoint hit."""
        if not self._planted or not getattr(e, "emulation", e.suberror == 1):
            return False
        cpu = self._current()
        if cpu is None:
            return False
        pc = R.RegisterFile(cpu.vcpu).linear_pc
        bp = self._bps.get(pc)
        if bp is None or bp.phys is None:
            return False
        self._stop_all(cpu, _Event(cpu, SIGTRAP, "swbreak:;"))
        return True

    def _on_machine_stop(self, stop: Stop) -> None:
        self._vm_stop = stop
        self._wakeup()

    # ------------------------------------------------------------ holding and releasing (stub side)
    def _hold_all(self, interrupt: bool = False) -> None:
        with self._cv:
            self._pause = True
            self._interrupted = self._interrupted or interrupt
        for cpu in self.cpus:
            cpu.vcpu.kick()

    def _all_parked(self) -> bool:
        # A vCPU given an action but not yet woken still counts as running.
        return all(cpu.parked and cpu.action is None for cpu in self.cpus)

    def _wait_all_parked(self) -> bool:
        with self._cv:
            while not self._all_parked():
                if self._vm_stop is not None or self._closing:
                    return False
                self._cv.wait(0.25)
        return True

    def _release(self, actions: dict[_Cpu, str]) -> None:
        for cpu in self.cpus:
            if cpu.regs is not None:
                cpu.regs.flush()
                cpu.regs = None
        with self._cv:
            self._events.clear()
            self._interrupted = False
            self._pause = False
            if self._bps and not (self.pvm and any(not (c.vcpu.get_sregs().cr0 & CR0_PE)
                                                   for c in self.cpus)):
                self._plant()
            for cpu in self.cpus:
                if cpu.parked:
                    cpu.action = actions.get(cpu, "c")    # None: stays held
            self._running = True
            self._cv.notify_all()
        self.resumed.set()

    def _plant(self) -> None:
        """Write int3 at every breakpoint (call with self._cv held)."""
        for bp in self._bps.values():
            if bp.phys is None:
                phys = self._translate(self.cpus[0], bp.addr)
                if phys is None or not self.machine.mem.contains(phys, 1):
                    continue
                bp.saved = self.machine.mem.read(phys, 1)
                self.machine.mem.write(phys, bytes((INT3,)))
                bp.phys = phys
        self._planted = True

    def _unplant(self) -> None:
        for bp in self._bps.values():
            if bp.phys is not None:
                if self.machine.mem.read(bp.phys, 1) == bytes((INT3,)):
                    self.machine.mem.write(bp.phys, bp.saved)
                bp.phys = None
        self._planted = False

    def _stopped(self) -> str | None:
        """If the vCPUs are all held after an event, the stop reply to send gdb."""
        with self._cv:
            if not (self._events or self._interrupted) or not self._all_parked():
                return None
            self._unplant()
            event = self._events[0] if self._events else None
            self._events.clear()
            self._interrupted = False
        if event is None:
            event = _Event(self._g_cpu, SIGINT)
        self._g_cpu = self._c_cpu = event.cpu
        self._last_stop = f"T{event.signal:02x}thread:{event.cpu.tid:x};{event.extra}"
        return self._last_stop

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
                try:
                    self._session(conn)
                except OSError:
                    pass
                finally:
                    conn.close()
                    self._detach()
                    self.log("gdb detached; the guest runs on")
            if self._vm_stop is not None:
                return

    def _session(self, conn: socket.socket) -> None:
        reader = PacketReader()
        self._noack = False
        if self._vm_stop is None:
            self._hold_all()
            self._wait_all_parked()
        self._running = False

        trace = self.log if os.environ.get("PYKVM_GDB_TRACE") else None

        def send(payload: str | bytes) -> None:
            if trace:
                trace(f"-> {payload[:200]!r}")
            conn.sendall(frame(payload))

        while True:
            if self._vm_stop is not None:
                status = self._vm_stop.status if self._vm_stop.status is not None else 0
                send(f"W{status & 0xFF:02x}")
                return
            if self._running:
                reply = self._stopped()
                if reply is not None:
                    self._running = False
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
                    if self._running:
                        self._hold_all(interrupt=True)
                    continue
                if kind == "ack":
                    continue
                if kind == "bad":
                    conn.sendall(b"-")
                    continue
                if not self._noack:
                    conn.sendall(b"+")
                reply = self._command(payload.decode("latin-1"), payload)
                if reply == "__detach__":
                    send("OK")
                    return
                if reply is not None:
                    send(reply)

    def _detach(self) -> None:
        with self._cv:
            self._unplant()
            self._bps.clear()
            self._hw = [None] * 4
            self._events.clear()
            self._pause = False
            self._running = False
            for cpu in self.cpus:
                if cpu.regs is not None:
                    cpu.regs.flush()
                    cpu.regs = None
                if cpu.parked:
                    cpu.action = "c"
            self._cv.notify_all()

    # ------------------------------------------------------------ commands
    def _cpu_by_tid(self, tid: int) -> _Cpu | None:
        if tid in (0, -1):
            return self.cpus[0]
        return next((c for c in self.cpus if c.tid == tid), None)

    def _rf(self, cpu: _Cpu) -> R.RegisterFile:
        if cpu.regs is None:
            cpu.regs = R.RegisterFile(cpu.vcpu)
        return cpu.regs

    def _command(self, text: str, raw: bytes) -> str | None:
        head = text[:1]
        if text == "?":
            return self._last_stop
        if text.startswith("qSupported"):
            return ("PacketSize=20000;qXfer:features:read+;swbreak+;hwbreak+;vContSupported+;"
                    "QStartNoAckMode+")
        if text == "QStartNoAckMode":
            self._noack = True
            return "OK"
        if text.startswith("qXfer:features:read:"):
            return self._xfer(text)
        if text == "qAttached":
            return "1"
        if text == "qC":
            return f"QC{self._g_cpu.tid:x}"
        if text == "qfThreadInfo":
            return "m" + ",".join(f"{c.tid:x}" for c in self.cpus)
        if text == "qsThreadInfo":
            return "l"
        if text.startswith("qThreadExtraInfo,"):
            cpu = self._cpu_by_tid(int(text.split(",")[1], 16))
            return f"vCPU {cpu.tid - 1}".encode().hex() if cpu else "E01"
        if text.startswith("qRcmd,"):
            return self._monitor(bytes.fromhex(text[6:]).decode(errors="replace").strip())
        if text.startswith("Qqemu.PhyMemMode:"):
            self._phys_mode = text.endswith("1")
            return "OK"
        if text == "qqemu.PhyMemMode":
            return "1" if self._phys_mode else "0"
        if head == "H":
            cpu = self._cpu_by_tid(_tid(text[2:]))
            if cpu is None:
                return "E01"
            if text[1] == "g":
                self._g_cpu = cpu
            else:
                self._c_cpu = cpu
            return "OK"
        if head == "T":
            return "OK" if self._cpu_by_tid(_tid(text[1:])) else "E01"
        if text == "g":
            rf = self._rf(self._g_cpu)
            return "".join(R.encode(r, rf) for r in self.regs)
        if head == "G":
            return self._write_all(text[1:])
        if head == "p":
            n = int(text[1:], 16)
            return R.encode(self.regs[n], self._rf(self._g_cpu)) if n < len(self.regs) else "E00"
        if head == "P":
            n, _, value = text[1:].partition("=")
            return self._write_reg(int(n, 16), value)
        if head == "m":
            addr, length = (int(x, 16) for x in text[1:].split(","))
            data = self._read_memory(self._g_cpu, addr, length)
            return data.hex() if data is not None else "E14"
        if head == "M":
            where, _, hexdata = text[1:].partition(":")
            addr = int(where.split(",")[0], 16)
            return "OK" if self._write_memory(self._g_cpu, addr, bytes.fromhex(hexdata)) else "E14"
        if head == "X":
            colon = raw.index(b":")
            addr = int(text[1:colon].split(",")[0], 16)
            return "OK" if self._write_memory(self._g_cpu, addr, raw[colon + 1:]) else "E14"
        if head in "Zz" and len(text) > 2:
            return self._breakpoint(text)
        if head in "cC":
            self._release({})
            return None
        if head in "sS":
            self._release({c: ("s" if c is self._c_cpu else None) for c in self.cpus})
            return None
        if text == "vCont?":
            return "vCont;c;C;s;S"
        if text.startswith("vCont;"):
            return self._vcont(text[6:])
        if text == "vMustReplyEmpty":
            return ""
        if head == "D":
            return "__detach__"
        if head == "k":
            self.machine.request_stop(Stop(StopReason.INTERRUPTED, message="gdb killed the guest"))
            return "__detach__"
        return ""                             # anything else: "not supported"

    def _xfer(self, text: str) -> str:
        annex, _, span = text[len("qXfer:features:read:"):].partition(":")
        if annex != "target.xml":
            return "E00"
        offset, length = (int(x, 16) for x in span.split(","))
        chunk = self.xml[offset:offset + length]
        return ("l" if offset + length >= len(self.xml) else "m") + chunk.decode()

    def _monitor(self, cmd: str) -> str:
        if cmd in ("phys on", "phys off"):
            self._phys_mode = cmd.endswith("on")
            out = f"memory commands now use {'physical' if self._phys_mode else 'virtual'} addresses\n"
        else:
            out = "pykvm monitor commands: phys on | phys off (m/M/X on guest-physical addresses)\n"
        return out.encode().hex()

    def _vcont(self, spec: str) -> str | None:
        actions: dict[_Cpu, str] = {}
        default = None
        for part in spec.split(";"):
            act, _, tid = part.partition(":")
            kind = {"c": "c", "C": "c", "s": "s", "S": "s"}.get(act[:1])
            if kind is None:
                return "E01"
            if tid:
                cpu = self._cpu_by_tid(_tid(tid))
                if cpu is not None and cpu not in actions:
                    actions[cpu] = kind
            elif default is None:
                default = kind
        for cpu in self.cpus:
            actions.setdefault(cpu, default)
        if all(a is None for a in actions.values()):
            return "E01"
        self._release(actions)       # a vCPU whose action is None stays held
        return None

    def _write_reg(self, n: int, value: str) -> str:
        if n >= len(self.regs):
            return "E00"
        reg = self.regs[n]
        if reg.set is None:
            return "E01"
        reg.set(self._rf(self._g_cpu), R.decode(reg, value))
        return "OK"

    def _write_all(self, data: str) -> str:
        rf, at = self._rf(self._g_cpu), 0
        for reg in self.regs:
            width = reg.size * 2
            if at + width > len(data):
                break
            if reg.set is not None:
                reg.set(rf, R.decode(reg, data[at:at + width]))
            at += width
        return "OK"

    def _breakpoint(self, text: str) -> str:
        kind, addr, length = text[1:].split(",", 2)
        addr = int(addr, 16)
        if kind in ("2", "3", "4") and self.pvm:
            if not self._told_hw:
                self._told_hw = True
                self.log("hardware watchpoints are not available on this KVM-PVM host (its "
                         "instruction emulator checks only execution breakpoints in DR7): gdb "
                         "falls back to software watchpoints, which single-step")
            return ""
        if kind != "0":
            return self._hw_point(text[0] == "Z", int(kind), addr, int(length.split(";")[0], 16))
        with self._cv:
            if text[0] == "Z":
                self._bps.setdefault(addr, _Breakpoint(addr))
            else:
                bp = self._bps.pop(addr, None)
                if bp is not None and bp.phys is not None and \
                        self.machine.mem.read(bp.phys, 1) == bytes((INT3,)):
                    self.machine.mem.write(bp.phys, bp.saved)
        return "OK"

    def _hw_point(self, insert: bool, kind: int, addr: int, length: int) -> str:
        if not valid_point(kind, addr, length):
            return "E22"                      # x86 watches 1, 2, 4 or 8 aligned bytes
        point = HwPoint(kind, addr, length if kind != 1 else 1)
        with self._cv:
            if insert:
                if point in self._hw:
                    return "OK"
                free = [i for i, p in enumerate(self._hw[:self.hw_bps]) if p is None]
                if not free:
                    return "E28"              # all debug registers in use (ENOSPC)
                self._hw[free[0]] = point
            else:
                self._hw = [None if p == point else p for p in self._hw]
        return "OK"

    # ------------------------------------------------------------ memory
    def _translate(self, cpu: _Cpu, addr: int) -> int | None:
        if self._phys_mode:
            return addr
        sregs = cpu.vcpu.get_sregs() if cpu.regs is None else cpu.regs.sregs
        if not sregs.cr0 & CR0_PG:
            return addr & 0xFFFFFFFF          # no paging: linear is physical
        try:
            phys = cpu.vcpu.translate(addr)
        except OSError:
            phys = None
        if phys is None and self.early_translate is not None:
            phys = self.early_translate(addr)
        return phys

    def _pieces(self, cpu: _Cpu, addr: int, length: int):
        while length > 0:
            n = min(length, PAGE - (addr & (PAGE - 1)))
            yield self._translate(cpu, addr), n
            addr += n
            length -= n

    def _read_memory(self, cpu: _Cpu, addr: int, length: int) -> bytes | None:
        out = bytearray()
        mem = self.machine.mem
        for phys, n in self._pieces(cpu, addr, length):
            if phys is None or not mem.contains(phys, n):
                return bytes(out) if out else None     # a short read, as gdb allows
            out += mem.read(phys, n)
        return bytes(out)

    def _write_memory(self, cpu: _Cpu, addr: int, data: bytes) -> bool:
        mem, at = self.machine.mem, 0
        for phys, n in self._pieces(cpu, addr, len(data)):
            if phys is None or not mem.contains(phys, n):
                return False
            mem.write(phys, data[at:at + n])
            at += n
        return True


def _tid(text: str) -> int:
    return -1 if text == "-1" else int(text or "0", 16)


__all__ = ["GdbStub", "GdbError", "parse_address"]
