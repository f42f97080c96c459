"""Seeing that a guest is done: a vCPU halted with interrupts off, which nothing will wake.

`hlt` stops an x86 CPU until an interrupt arrives (Intel SDM Vol. 2A, "HLT"). With RFLAGS.IF clear,
maskable interrupts cannot arrive, so only an NMI, SMI, INIT or reset can wake it (SDM Vol. 3A,
6.8.1 and 8.4: a halted AP also waits for INIT/SIPI). pykvm sends none of those on its own. So a
vCPU in `hlt` with IF=0 and no NMI queued is the end of the run. It is how Linux ends a `halt`
and, with no power-off hardware (no ACPI PM1a), a `poweroff` too: "reboot: System halted", then
stop_this_cpu() in arch/x86/kernel/process.c disables interrupts and executes `hlt` in a loop.

Who sees that `hlt` depends on the interrupt controller:

- **irqchip="user"** (or none): KVM cannot wait for interrupts it does not deliver, so every `hlt`
  is a KVM_EXIT_HLT to the VMM, with `kvm_run.if_flag`. Machine's Hlt handler decides at once.
- **irqchip="kernel"**: KVM waits in the kernel (kvm_vcpu_halt()) until its LAPIC has something
  to deliver, and the VMM sees no exit at all: the vCPU thread sleeps inside KVM_RUN. A kick
  (Machine.watchdog_period) brings it out with EINTR; then KVM_GET_MP_STATE says HALTED,
  KVM_GET_REGS gives RFLAGS, and KVM_GET_VCPU_EVENTS says whether an NMI is pending. `HaltWatch`
  is that check, as a Machine.interrupted_handlers entry.

The decision itself, `halted_for_good`, is a plain function over plain values, tested with made-up
states. It takes every vCPU's state: a machine is done when each vCPU is either halted for good or
parked waiting for an INIT/SIPI that no one is left to send. (An ioctl on a vCPU fd waits while
another thread is inside that vCPU's KVM_RUN, so with several vCPU threads each thread must read its
own state: HaltWatch keeps what each vCPU's thread read on its kicks, and decides over all of them
once every vCPU has been seen stuck across a whole round of kicks, see _all_stuck_at_once.)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable

from .stop import Stop, StopReason

RFLAGS_IF = 1 << 9       # interrupt enable flag (SDM Vol. 1, 3.4.3.2)


@dataclass(frozen=True)
class VcpuState:
    """What decides whether one vCPU can still run: read from KVM, or made up in tests."""

    halted: bool                    # in `hlt` (KVM_MP_STATE_HALTED, or a Hlt exit just seen)
    interrupts_enabled: bool        # RFLAGS.IF
    nmi_pending: bool = False       # an NMI queued or being injected: it would wake the CPU
    waiting_for_sipi: bool = False  # an AP before (or after) INIT: runs only when a SIPI comes

    @property
    def stuck(self) -> bool:
        """Nothing inside this vCPU can make it run again."""
        if self.nmi_pending:
            return False
        return self.waiting_for_sipi or (self.halted and not self.interrupts_enabled)


def halted_for_good(vcpus: Iterable[VcpuState]) -> bool:
    """True when the whole machine can never run again: every vCPU stuck and at least one of them
    halted (all vCPUs waiting for a SIPI is a machine that has not started, not one that ended)."""
    states = list(vcpus)
    return bool(states) and all(s.stuck for s in states) and any(s.halted for s in states)


def read_vcpu_state(vcpu) -> VcpuState:
    """The state of a vCPU that is not inside KVM_RUN (in-kernel irqchip), from three ioctls; the
    registers and events are read only when the vCPU is halted or parked."""
    activity = vcpu.activity()                      # KVM_GET_MP_STATE
    if activity not in ("halted", "waiting-for-sipi"):
        return VcpuState(halted=False, interrupts_enabled=True)
    rflags = vcpu.get_regs().rflags
    nmi = vcpu.get_vcpu_events().nmi
    return VcpuState(halted=activity == "halted",
                     interrupts_enabled=bool(rflags & RFLAGS_IF),
                     nmi_pending=bool(nmi.pending or nmi.injected),
                     waiting_for_sipi=activity == "waiting-for-sipi")


class HaltWatch:
    """A Machine.interrupted_handlers entry: on each kick, look whether the vCPU is halted for good
    and if so stop the machine with reason "halt". `checks` counts the looks, for tests."""

    MESSAGE = ("the vCPU halted with interrupts off and no NMI pending (KVM_MP_STATE_HALTED, "
               "RFLAGS.IF=0): nothing can wake it")

    def __init__(self, read=read_vcpu_state):
        self._read = read
        self.checks = 0
        # vCPU index -> [latest state, when it was read, when its current stuck streak began,
        # how many looks that streak has had]; "when" counts looks, so tests need no clock.
        self._seen: dict[int, list] = {}
        self._lock = threading.Lock()

    def check(self, machine) -> None:
        if machine.irqchip != "kernel":
            return              # the Hlt exit handler decides (see the module docstring)
        vcpu = machine.vcpu     # the calling thread's own vCPU (Machine.vcpu)
        state = self._read(vcpu)
        vcpus = getattr(machine, "vcpus", [vcpu])
        with self._lock:
            self.checks += 1
            now = self.checks
            index = getattr(vcpu, "index", 0)
            old = self._seen.get(index)
            if state.stuck:
                since, looks = (old[2], old[3] + 1) if old and old[2] is not None else (now, 1)
            else:
                since, looks = None, 0
            self._seen[index] = [state, now, since, looks]
            done = len(self._seen) >= len(vcpus) and self._all_stuck_at_once(len(vcpus))
        if done:
            machine.request_stop(Stop(StopReason.HALT, message=self.MESSAGE))

    def _all_stuck_at_once(self, n: int) -> bool:
        """Each vCPU's state was read by its own thread at its own moment, so the latest states
        are not one snapshot: a vCPU seen stuck may have been woken since (an INIT/SIPI from one
        still running then) and not looked at again. With several vCPUs, ask for a moment when
        all were stuck: every stuck streak began before every vCPU's latest look, and each streak
        has lasted at least two looks (a whole watchdog round)."""
        records = list(self._seen.values())
        if not halted_for_good(r[0] for r in records):
            return False
        if n == 1:
            return True
        return (all(r[3] >= 2 for r in records)
                and max(r[2] for r in records) <= min(r[1] for r in records))


def watch_for_final_halt(machine, period: float = 0.5) -> HaltWatch:
    """Make `machine` stop (reason "halt") when its vCPU halts for good: install a HaltWatch and
    kick the vCPU at least every `period` seconds so the watch gets to look. A kick costs one
    KVM_RUN return; twice a second is nothing next to a guest's own exits."""
    watch = HaltWatch()
    machine.interrupted_handlers.append(watch.check)
    if not machine.watchdog_period or machine.watchdog_period > period:
        machine.watchdog_period = period
    return watch
