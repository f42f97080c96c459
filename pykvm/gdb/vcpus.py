"""Holding and releasing the vCPUs for gdb (all-stop mode, as gdb expects by default).

When one vCPU stops (breakpoint, finished step, Ctrl-C), the others are kicked out of KVM_RUN and
held too before gdb hears of it; `c`/`s`/`vCont` releases them. A vCPU is "held" (parked) inside
the run loop's exit handler, in its own thread, waiting on a condition: registers and memory are
then read from the stub's thread while no KVM_RUN is active. Each vCPU is a gdb thread (id = vCPU
index + 1).

How the CPU is made to stop (KVM_SET_GUEST_DEBUG, Documentation/virt/kvm/api.rst):
- single-step: KVM_GUESTDBG_SINGLESTEP, a `Debug` exit (#DB, exception 1) after one instruction;
  KVM_GUESTDBG_BLOCKIRQ keeps an interrupt from being taken inside the step where KVM has it.
- software breakpoints (pykvm/gdb/breakpoints.py plants the int3s): with KVM_GUESTDBG_USE_SW_BP,
  KVM intercepts the #BP and exits with `Debug` (exception 3) and RIP still on the int3, which is
  reported as `swbreak` at that address. An int3 the stub did not plant is the guest's own: it is
  given back with KVM_GUESTDBG_INJECT_BP.
- KVM-PVM hosts (docs/kvm-pvm.md): CPL0 code is emulated and the emulator knows no int3, so KVM_RUN
  ends with an emulation-failure internal error at the int3 - taken as a hit at our own
  breakpoints. In real mode that emulator *does* run int3 (through the IVT), so there the vCPU
  continues by single-stepping and compares each new PC with the breakpoints instead, until the
  guest leaves real mode. Guest code at CPL3 runs natively there and its #DB/#BP go to the guest's
  own IDT: for 64-bit guests (x86-64 stubs; `pykvm boot` leaves it off for Linux) the stub catches
  them at the entry of the guest's handlers and unwinds the frame (pykvm/gdb/usertraps.py), and
  single-steps the guest until it has an IDT to catch them in.
- hardware breakpoints: KVM_GUESTDBG_USE_HW_BP with DR0-DR3/DR7; a hit is a `Debug` exit whose DR6
  bits 0-3 name the slot.
- Ctrl-C in gdb (byte 0x03): every vCPU is kicked and held; the stop is reported as SIGINT.

While gdb holds the VM, the machine's run clock is held too (Machine.run_clock): `--timeout` counts
the time the guest was let run, not the time a person spent reading registers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..stop import Stop, StopReason
from . import registers as R
from .debugregs import WATCH_REPLY

SIGINT, SIGTRAP = 2, 5
CR0_PE = 1 << 0


@dataclass(eq=False)
class Cpu:
    """One vCPU as the stub sees it."""
    vcpu: object
    tid: int                            # gdb's thread id: vCPU index + 1
    parked: bool = False
    action: str | None = None           # "c" or "s": what to do when released
    mode: str = "run"                   # while running: "run", "step", "step-to-bp", "step-over"
    after_step_over: str = "c"          # what to do once stepped over a catcher
    control: int = -1                   # the guest-debug control last set (-1: never)
    debugreg: tuple = ()                # and the debug registers given with it
    inject_bp: bool = False
    regs: R.RegisterFile | None = None  # cached while held (gdb's g/p/P), flushed on release

    def register_file(self) -> R.RegisterFile:
        if self.regs is None:
            self.regs = R.RegisterFile(self.vcpu)
        return self.regs

    def flush(self) -> None:
        if self.regs is not None:
            self.regs.flush()
            self.regs = None


@dataclass
class Event:
    """Why a vCPU stopped, as gdb's stop reply will say it."""
    cpu: Cpu
    signal: int
    extra: str = ""                     # e.g. "swbreak:;"


class VcpuControl:
    """The stop-and-go state shared by the vCPU threads and the stub's thread.

    `lock` guards it (the same condition the breakpoints are edited under); `wakeup()` tells the
    stub's thread something changed (a stop to report)."""

    def __init__(self, machine, vcpus: list, breakpoints, lock: threading.Condition, *,
                 pvm: bool, wakeup: Callable[[], None], user_traps=None):
        from ..kvm import headers as lib     # KVM_GUESTDBG_* from <linux/kvm.h>, via the binding
        self.lib = lib
        self.machine = machine
        self.cpus = [Cpu(v, i + 1) for i, v in enumerate(vcpus)]
        self.bps = breakpoints
        self.cv = lock
        self.pvm = pvm
        self.wakeup = wakeup
        self.traps = user_traps             # pykvm.gdb.usertraps.UserTraps, or None
        self.pause = False                  # held: vCPUs park at their next exit
        self.events: list[Event] = []
        self.interrupted = False            # gdb sent Ctrl-C while running
        self.running = False                # gdb is waiting for a stop reply
        self.closing = False
        # Machine.run_clock (pykvm/runclock.py); test doubles of a machine may have none.
        self._clock = getattr(machine, "run_clock", None)

    # ---- the run clock follows `pause`
    def _set_pause(self, held: bool) -> None:
        self.pause = held
        if self._clock is not None:
            (self._clock.hold if held else self._clock.release)()

    # ---- the vCPU side (vCPU threads)
    def current(self) -> Cpu | None:
        me = threading.get_ident()
        for cpu in self.cpus:
            if cpu.vcpu.thread_id == me:
                return cpu
        return self.cpus[0] if len(self.cpus) == 1 else None

    def park(self, cpu: Cpu, event: Event | None) -> None:
        """Hold this vCPU (we are in its thread) until gdb releases it or the VM is stopping."""
        with self.cv:
            if event is not None:
                self.events.append(event)
                self._set_pause(True)
            cpu.parked = True
            self.cv.notify_all()
            self.wakeup()
            while cpu.action is None and not self.machine.stop_requested and not self.closing:
                self.cv.wait(0.25)
            action, cpu.action = cpu.action or "c", None
            cpu.parked = False
        if not self.machine.stop_requested:
            self.resume_cpu(cpu, action)

    def stop_all(self, cpu: Cpu, event: Event) -> None:
        with self.cv:
            self._set_pause(True)
        for other in self.cpus:
            if other is not cpu:
                other.vcpu.kick()
        self.park(cpu, event)

    def resume_cpu(self, cpu: Cpu, action: str) -> None:
        """Set the vCPU's guest-debug mode for `action` (in its own thread, before KVM_RUN)."""
        lib = self.lib
        control = 0
        if action == "s":
            cpu.mode = "step"
            control = lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP | lib.KVM_GUESTDBG_BLOCKIRQ
        elif self.bps.software and (not self.bps.planted or self.bps.catch_pending):
            cpu.mode = "step-to-bp"        # real mode, or no IDT yet, on KVM-PVM: see above
            control = lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP
        else:
            cpu.mode = "run"
            if self.bps.software:
                control = lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_SW_BP
        if cpu.inject_bp:
            control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_INJECT_BP
            cpu.inject_bp = False
        debugreg = self.bps.debugreg()
        if debugreg:
            control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP
        self._set_debug(cpu, control, debugreg)

    def _set_debug(self, cpu: Cpu, control: int, debugreg: tuple = ()) -> None:
        if (control, debugreg) == (cpu.control, cpu.debugreg) \
                and not control & self.lib.KVM_GUESTDBG_INJECT_BP:
            return
        try:
            cpu.vcpu.set_guest_debug(control, debugreg)
        except OSError:
            # KVM_GUESTDBG_BLOCKIRQ is Linux 5.16+: older KVMs refuse the unknown bit.
            control &= ~self.lib.KVM_GUESTDBG_BLOCKIRQ
            cpu.vcpu.set_guest_debug(control, debugreg)
        cpu.control = control
        cpu.debugreg = debugreg

    # ---- the machine's exit hooks (vCPU threads)
    def on_interrupted(self, machine) -> None:
        if not self.pause:
            return
        cpu = self.current()
        if cpu is not None:
            self.park(cpu, None)

    def on_debug(self, machine, e) -> Stop | None:
        cpu = self.current()
        if cpu is None:
            return Stop(StopReason.ERROR, message=f"debug exit on a vCPU the gdb stub does not hold: {e!r}")
        rf = R.RegisterFile(cpu.vcpu)
        pc = rf.linear_pc
        if cpu.mode == "step-over":          # past the handler's first instruction: catch again
            with self.cv:
                self.bps.plant()
            self.resume_cpu(cpu, cpu.after_step_over)
            return None
        if e.exception == 3:                 # #BP: an int3 ran
            if self.bps.at(pc):
                self.stop_all(cpu, Event(cpu, SIGTRAP, "swbreak:;"))
            else:                            # the guest's own int3: give it back
                cpu.inject_bp = True
                self.resume_cpu(cpu, "c" if cpu.mode != "step" else "s")
            return None
        point = self.bps.hit_slot(e.dr6)
        if point is not None:                # a debug-register breakpoint or watchpoint
            extra = "hwbreak:;" if point.kind == 1 else f"{WATCH_REPLY[point.kind]}:{point.addr:x};"
            self.stop_all(cpu, Event(cpu, SIGTRAP, extra))
        elif cpu.mode == "step":
            self.stop_all(cpu, Event(cpu, SIGTRAP))
        elif cpu.mode == "step-to-bp":
            if self.bps.at(pc):
                self.stop_all(cpu, Event(cpu, SIGTRAP, "swbreak:;"))
            elif rf.sregs.cr0 & CR0_PE:      # out of real mode: plant the int3s and run freely
                with self.cv:
                    if self.bps.catch_pending:  # once there is an IDT to catch CPL3 traps in
                        self.bps.catch(self.traps.handlers(cpu))
                    self.bps.plant()
                self.resume_cpu(cpu, "c")   # steps on while the catchers are pending
        else:                                # a #DB we did not ask for (hardware breakpoint?)
            self.stop_all(cpu, Event(cpu, SIGTRAP))
        return None

    def on_internal_error(self, machine, e) -> bool:
        """KVM-PVM: an int3 at CPL0 is an emulation failure with RIP on it. Ours: a breakpoint hit,
        or a catcher on a #BP/#DB handler (pykvm/gdb/usertraps.py)."""
        if not self.bps.planted or not getattr(e, "emulation", e.suberror == 1):
            return False
        cpu = self.current()
        if cpu is None:
            return False
        pc = R.RegisterFile(cpu.vcpu).linear_pc
        vector = self.bps.catcher_at(pc)
        if vector is not None:
            extra = self._caught(cpu, vector)
            if extra is not None:            # our CPL3 breakpoint or step, unwound
                self.stop_all(cpu, Event(cpu, SIGTRAP, extra))
            else:                            # the guest's own trap: its handler runs
                with self.cv:
                    self.bps.lift(pc)
                cpu.after_step_over = "s" if cpu.mode == "step" else "c"
                cpu.mode = "step-over"
                lib, debugreg = self.lib, self.bps.debugreg()
                control = lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP
                self._set_debug(cpu, control | (lib.KVM_GUESTDBG_USE_HW_BP if debugreg else 0),
                                debugreg)
            return True
        if not self.bps.planted_at(pc):
            return False
        self.stop_all(cpu, Event(cpu, SIGTRAP, "swbreak:;"))
        return True

    def _caught(self, cpu: Cpu, vector: int) -> str | None:
        """A CPL3 trap stopped at a catcher: if it is one the stub caused, the vCPU is put back in
        user mode where it happened and the stop reply's extra is returned; else None."""
        frame = self.traps.frame(cpu)
        if frame is None:
            return None
        rip, cs, rflags, rsp, ss = frame
        if cs & 3 != 3:
            return None
        if vector == 3 and self.bps.planted_at(rip - 1):
            rip, extra = rip - 1, "swbreak:;"
        elif vector == 1 and cpu.mode == "step":
            extra = ""
        else:
            return None
        if not self.traps.unwind(cpu, rip, cs, rflags, rsp, ss):
            return None
        # KVM sets RFLAGS.TF for a step at KVM_SET_GUEST_DEBUG time, for the RIP it had then
        # (arch/x86/kvm/x86.c, __kvm_set_rflags): the next step must set it again.
        cpu.control = -1
        return extra

    # ---- holding and releasing (the stub's thread)
    def hold_all(self, interrupt: bool = False) -> None:
        with self.cv:
            self._set_pause(True)
            self.interrupted = self.interrupted or interrupt
        for cpu in self.cpus:
            cpu.vcpu.kick()

    def all_parked(self) -> bool:
        # A vCPU given an action but not yet woken still counts as running.
        return all(cpu.parked and cpu.action is None for cpu in self.cpus)

    def wait_all_parked(self, give_up: Callable[[], bool]) -> bool:
        with self.cv:
            while not self.all_parked():
                if give_up() or self.closing:
                    return False
                self.cv.wait(0.25)
        return True

    def release(self, actions: dict[Cpu, str | None]) -> None:
        """Let the held vCPUs go: each does actions[cpu] ("c", "s"; None: stays held; a vCPU not
        named continues)."""
        for cpu in self.cpus:
            cpu.flush()
        stepping = any(a == "s" for a in actions.values())
        with self.cv:
            self.events.clear()
            self.interrupted = False
            self._set_pause(False)
            real_mode = self.pvm and any(not (c.vcpu.get_sregs().cr0 & CR0_PE) for c in self.cpus)
            if self.traps is not None:       # catchers: KVM-PVM, 64-bit firmware (usertraps.py)
                if self.bps.software or stepping:
                    self.bps.catch(None if real_mode else self.traps.handlers(self.cpus[0]))
                else:
                    self.bps.uncatch()
            if (self.bps.software or self.bps.catchers) and not real_mode:
                self.bps.plant()
            for cpu in self.cpus:
                if cpu.parked:
                    cpu.action = actions.get(cpu, "c")
            self.running = True
            self.cv.notify_all()

    def stopped(self, default: Cpu) -> Event | None:
        """If the vCPUs are all held after an event, that event (SIGINT on `default` for Ctrl-C)."""
        with self.cv:
            if not (self.events or self.interrupted) or not self.all_parked():
                return None
            self.bps.unplant()
            event = self.events[0] if self.events else None
            self.events.clear()
            self.interrupted = False
        return event or Event(default, SIGINT)

    def detach(self) -> None:
        """gdb went away: no breakpoints, every vCPU let go."""
        with self.cv:
            self.bps.clear()
            self.events.clear()
            self._set_pause(False)
            self.running = False
            for cpu in self.cpus:
                cpu.flush()
                if cpu.parked:
                    cpu.action = "c"
            self.cv.notify_all()

    def let_go(self) -> None:
        """The stub is closing: every held vCPU continues, none parks again."""
        self.closing = True
        with self.cv:
            self._set_pause(False)
            for cpu in self.cpus:
                if cpu.parked:
                    cpu.action = cpu.action or "c"
            self.cv.notify_all()
