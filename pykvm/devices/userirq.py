"""`UserIrqChip`: the PC's interrupt hardware in Python, for KVM with no in-kernel irqchip.

KVM offers three ways to model a PC's interrupt controllers:

1. **In-kernel irqchip** (KVM_CREATE_IRQCHIP, + KVM_CREATE_PIT2): PIC, IOAPIC, local APIC and PIT all
   live in the kernel. Fastest; pykvm's `irqchip="kernel"`.
2. **Split irqchip** (KVM_CAP_SPLIT_IRQCHIP): the local APIC stays in the kernel, the PIC and IOAPIC
   move to userspace. But the userspace side must then be an IOAPIC that turns pin changes into MSI
   messages through KVM's GSI routing (KVM_SET_GSI_ROUTING, KVM_SIGNAL_MSI) and handle EOI broadcast
   exits; the legacy 8259 is not wired to the CPU at all in that mode (KVM_INTERRUPT is refused with an
   in-kernel LAPIC). It is the design for many-CPU guests with MSI, not for a Python PIC.
3. **No in-kernel irqchip** (this module): KVM knows nothing about interrupt controllers. The VMM
   decides which vector the CPU takes and injects it with KVM_INTERRUPT when the vCPU can accept one
   (`kvm_run.ready_for_interrupt_injection` and `kvm_run.if_flag`); otherwise it sets
   `kvm_run.request_interrupt_window` and KVM exits (KVM_EXIT_IRQ_WINDOW_OPEN) as soon as the guest
   can take it. `hlt` exits to the VMM (KVM_EXIT_HLT), which waits for an interrupt itself.
   A uniprocessor Linux guest booted with `nolapic noapic` (no LAPIC: KVM would not emulate one)
   takes the 8259's interrupts exactly this way, which is what our Python I8259Pair needs: this is
   option 3, with every step visible (and testable) in Python.

The pieces: `I8259Pair` (0x20, 0xa0, 0x4d0), `I8254Pit` (0x40-0x43) with channel 0 on IRQ 0, and
`SystemControlPortB` (0x61). The chip is KVM-independent; the Machine glues it to the vCPU.

Contract with the run loop (pykvm.machine, irqchip="user"), once per KVM_RUN:

    plan = chip.before_run(time.monotonic(), can_inject=bool(run.ready_for_interrupt_injection
                                                             and run.if_flag))
    if plan.vector is not None:
        vcpu.interrupt(plan.vector)              # KVM_INTERRUPT
    run.request_interrupt_window = int(plan.want_window)
    exit = vcpu.run()

- `before_run` brings the PIT's IRQ 0 up to date at `now`, then: if the PIC's INTR is up and
  `can_inject`, it runs the INTA cycle and returns the vector (the PIC's ISR now says "in service": the
  caller MUST inject it); if INTR is up but the vCPU cannot take it, it returns want_window=True and no
  vector (nothing is acknowledged: the guest may still mask or lower the request before it opens the
  window, and then the INTA gives the 8259's spurious IR7). `deadline` is the clock time of the next
  timer interrupt (None: none coming); with a `kick` function given, the chip arms its own timer
  thread to call `kick()` at that time, so a guest running flat out is still interrupted.
  (It takes `can_inject` because the acknowledge must not happen unless the vector is injected.)
- KVM_EXIT_IRQ_WINDOW_OPEN and KVM_EXIT_INTR (a kick) need no handling: the next before_run injects.
- KVM_EXIT_HLT: if `run.if_flag` is set, call `wait_for_interrupt()` (blocks until INTR rises, the
  next PIT deadline passes, or `wake()` is called, e.g. by Machine.request_stop) and go on running; with
  interrupts disabled the guest has halted for good.
- Interrupts raised from other threads (the serial input thread feeding COM1) call `kick()` so a
  vCPU inside KVM_RUN comes out to take them; raised on the vCPU thread, they are picked up by the
  next before_run without a kick.

Shortcut, admitted: one vCPU. The 8259's INTR is wired to the boot CPU only, as on a PC without APICs.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, NamedTuple

from pykvm.devices.i8254 import I8254Pit, SystemControlPortB
from pykvm.devices.i8259 import I8259Pair
from pykvm.irq import IrqLine
from pykvm.devices.state import Stateful
from pykvm.workers import start_worker
from pykvm.x86 import layout



class RunPlan(NamedTuple):
    vector: int | None      # inject this with KVM_INTERRUPT now (already acknowledged)
    want_window: bool       # set kvm_run.request_interrupt_window
    deadline: float | None  # clock time of the next timer interrupt


class _DeadlineTimer:
    """One thread that calls `kick()` when the earliest armed deadline passes."""

    def __init__(self, kick: Callable[[], None], clock: Callable[[], float], on_error=None):
        self._kick = kick
        self._on_error = on_error     # (thread name, exception) if the thread dies (workers.py)
        self._clock = clock
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.fired = 0

    def arm(self, deadline: float | None) -> None:
        # Called before every KVM_RUN, nearly always with the deadline already armed: compare
        # before taking the lock. (A stale read can only be a deadline that has just fired and
        # kicked; re-arming it would kick again for nothing.)
        if deadline == self._deadline:
            return
        with self._cond:
            if deadline == self._deadline:
                return
            self._deadline = deadline
            if self._thread is None and deadline is not None:
                self._thread = start_worker("pykvm-pit-timer", self._body, self._on_error)
            self._cond.notify()

    def _body(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                delay = self._deadline - self._clock()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                self._deadline = None
                self.fired += 1
                self._kick()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(1.0)


class UserIrqChip(Stateful):
    """PIC pair + PIT + port 0x61, and the injection decisions for a KVM vCPU without an irqchip.

    `pic`, `pit`, `port61`: the device models. `irq_line(n)`: the IrqLine for ISA IRQ n (what
    Machine.irq_line should return in this mode). `register_on(pio_bus)`: claim 0x20-0x21, 0xa0-0xa1,
    0x4d0-0x4d1, 0x40-0x43 and 0x61. `before_run`, `wait_for_interrupt`, `wake`: see the module
    docstring. `close()` stops the deadline timer thread.
    """

    STATE = ("pic", "pit", "port61", "injected", "windows_requested")

    def __init__(self, kick: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, on_worker_error=None):
        self.clock = clock
        self.pic = I8259Pair(on_intr_change=self._intr_changed)
        self.pit = I8254Pit(self.pic.pin(0), clock)
        self.port61 = SystemControlPortB(self.pit)
        self.kick = kick
        self._timer = _DeadlineTimer(kick, clock, on_worker_error) if kick is not None else None
        self._cond = threading.Condition()
        self._events = 0
        self._runner: int | None = None     # the vCPU thread, learnt in before_run
        self._woken = False
        self.injected = 0
        self.windows_requested = 0

    def register_on(self, bus) -> None:
        self.pic.register_on(bus)
        bus.register(layout.PORT_PIT, 4, self.pit, "i8254 PIT")
        bus.register(layout.PORT_SYSTEM_CONTROL_B, 1, self.port61, "port 0x61")

    def irq_line(self, n: int) -> IrqLine:
        return self.pic.pin(n)

    # --- the run-loop contract ---
    def before_run(self, now: float, can_inject: bool = True) -> RunPlan:
        self._runner = threading.get_ident()
        self.pit.poll(now)
        vector = None
        want_window = False
        if self.pic.pending():
            if can_inject:
                vector = self.pic.acknowledge()
                self.injected += 1
                # Another request may be waiting behind this one: ask for the window so the loop
                # comes back as soon as the guest can take it (KVM ignores it while injecting).
                want_window = self.pic.pending()
            else:
                want_window = True
                self.windows_requested += 1
        deadline = self.pit.next_irq_deadline()
        if self._timer is not None:
            self._timer.arm(deadline)
        return RunPlan(vector, want_window, deadline)

    def wait_for_interrupt(self, timeout: float | None = None) -> bool:
        """For `hlt` with interrupts enabled: block until INTR is up (True), or until `timeout`
        seconds pass or `wake()` is called (False). PIT deadlines on the way are served."""
        end = None if timeout is None else self.clock() + timeout
        while True:
            with self._cond:
                if self._woken:
                    self._woken = False
                    return False
                seen = self._events
            now = self.clock()
            self.pit.poll(now)
            if self.pic.pending():
                return True
            if end is not None and now >= end:
                return False
            limit = min((t for t in (self.pit.next_irq_deadline(), end) if t is not None),
                        default=None)
            with self._cond:
                if self._events == seen and not self._woken:
                    self._cond.wait(None if limit is None else max(limit - now, 0.0))

    def wake(self) -> None:
        """Make a wait_for_interrupt in progress return (the VMM wants to stop)."""
        with self._cond:
            self._woken = True
            self._events += 1
            self._cond.notify_all()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()

    # --- internals ---
    def _intr_changed(self, level: bool) -> None:
        # Called under the PIC's lock: only record and kick (lock order: PIC, then ours).
        if not level:
            return
        with self._cond:
            self._events += 1
            self._cond.notify_all()
        if self.kick is not None and threading.get_ident() != self._runner:
            self.kick()
