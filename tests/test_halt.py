"""The end of a run: a vCPU halted with interrupts off (pykvm.halt).

The decision is tested with made-up states; then tiny real-mode guests show both ways a final hlt
reaches pykvm: inside KVM with the in-kernel irqchip (seen through KVM_GET_MP_STATE on a watchdog
kick), and as a Hlt exit without it.
"""

import time

import pytest

from pykvm.halt import HaltWatch, VcpuState, halted_for_good, watch_for_final_halt
from pykvm.machine import Machine

from conftest import load_real_mode, needs_kvm

HALTED_IF0 = VcpuState(halted=True, interrupts_enabled=False)


@pytest.mark.parametrize("state, final", [
    (HALTED_IF0, True),
    (VcpuState(halted=True, interrupts_enabled=True), False),       # idle: a timer will wake it
    (VcpuState(halted=True, interrupts_enabled=False, nmi_pending=True), False),
    (VcpuState(halted=False, interrupts_enabled=False), False),     # running with IF=0
    (VcpuState(halted=False, interrupts_enabled=True), False),
    (VcpuState(halted=False, interrupts_enabled=False, waiting_for_sipi=True), False),
])
def test_one_vcpu(state, final):
    assert halted_for_good([state]) is final


def test_every_vcpu_must_be_stuck():
    parked_ap = VcpuState(halted=False, interrupts_enabled=False, waiting_for_sipi=True)
    idle = VcpuState(halted=True, interrupts_enabled=True)
    assert halted_for_good([HALTED_IF0, HALTED_IF0])
    assert halted_for_good([HALTED_IF0, parked_ap])        # no one left to send the SIPI
    assert not halted_for_good([HALTED_IF0, idle])
    assert not halted_for_good([parked_ap, parked_ap])     # not started is not ended
    assert not halted_for_good([])


class FakeMachine:
    def __init__(self, irqchip="kernel"):
        self.irqchip = irqchip
        self.vcpu = object()
        self.stops = []
        self.interrupted_handlers = []
        self.watchdog_period = None

    def request_stop(self, stop):
        self.stops.append(stop)


def test_watch_stops_only_a_machine_halted_for_good():
    states = iter([VcpuState(halted=True, interrupts_enabled=True), HALTED_IF0])
    watch = HaltWatch(read=lambda vcpu: next(states))
    m = FakeMachine()
    watch.check(m)
    assert m.stops == []
    watch.check(m)
    assert [s.reason for s in m.stops] == ["halt"]


class Cpu:
    def __init__(self, index):
        self.index = index


class FakeSmp(FakeMachine):
    """Several vCPUs; `vcpu` is whichever one's thread is looking (set by the test)."""

    def __init__(self, n):
        super().__init__()
        self.vcpus = [Cpu(i) for i in range(n)]


RUNNING = VcpuState(halted=False, interrupts_enabled=True)
PARKED = VcpuState(halted=False, interrupts_enabled=False, waiting_for_sipi=True)


def looks(watch, m, sequence):
    """Each (vCPU index, state): that vCPU's thread looks and reads that state."""
    states = {}
    watch._read = lambda vcpu: states[vcpu.index]
    for index, state in sequence:
        states[index] = state
        m.vcpu = m.vcpus[index]
        watch.check(m)
    return [s.reason for s in m.stops]


def test_smp_all_vcpus_halted_for_a_whole_round_ends_the_run():
    m, watch = FakeSmp(2), HaltWatch()
    assert looks(watch, m, [(0, HALTED_IF0), (1, RUNNING), (0, HALTED_IF0)]) == []
    assert looks(watch, m, [(1, HALTED_IF0)]) == []          # one look at vCPU 1 is not a round
    assert looks(watch, m, [(0, HALTED_IF0), (1, HALTED_IF0)]) == ["halt"]


def test_smp_a_parked_ap_and_a_halted_bsp_end_the_run():
    m, watch = FakeSmp(2), HaltWatch()
    assert looks(watch, m, [(0, HALTED_IF0), (1, PARKED), (0, HALTED_IF0), (1, PARKED)]) == ["halt"]


def test_smp_a_stale_stuck_look_does_not_end_the_run():
    # vCPU 0 was seen halted, then vCPU 1 (running) woke it with INIT/SIPI and halted itself:
    # vCPU 0's only stuck look is older than its wake-up, so no moment had both stuck.
    m, watch = FakeSmp(2), HaltWatch()
    assert looks(watch, m, [(1, RUNNING), (0, HALTED_IF0), (1, HALTED_IF0), (1, HALTED_IF0)]) == []
    assert looks(watch, m, [(0, RUNNING), (1, HALTED_IF0)]) == []    # vCPU 0 runs: streak over


def test_watch_leaves_the_user_irqchip_to_the_hlt_exit():
    watch = HaltWatch(read=lambda vcpu: pytest.fail("no ioctl without the in-kernel irqchip"))
    m = FakeMachine(irqchip="user")
    watch.check(m)
    assert m.stops == [] and watch.checks == 0


def test_watch_installs_a_watchdog_no_slower_than_asked():
    m = FakeMachine()
    m.watchdog_period = 1.0
    watch_for_final_halt(m, period=0.5)
    assert m.watchdog_period == 0.5 and len(m.interrupted_handlers) == 1
    m.watchdog_period = 0.1
    watch_for_final_halt(m, period=0.5)
    assert m.watchdog_period == 0.1


# Real mode at 0x1000: cli; hlt; jmp back to hlt (what Linux's stop_this_cpu() amounts to).
CLI_HLT = bytes([0xfa, 0xf4, 0xeb, 0xfd])
# sti; hlt; jmp back: an idle CPU waiting for interrupts (none will come: the PIT is not set up).
STI_HLT = bytes([0xfb, 0xf4, 0xeb, 0xfd])


@needs_kvm
def test_in_kernel_irqchip_final_hlt_is_seen_on_a_kick():
    with Machine(1 << 20, irqchip="kernel") as m:
        watch = watch_for_final_halt(m, period=0.1)
        load_real_mode(m, CLI_HLT)
        stop = m.run(timeout=60)
        assert stop.reason == "halt", stop
        assert stop.message == HaltWatch.MESSAGE
        assert watch.checks >= 1
        assert "HLT" not in m.vcpu.exit_counts()     # KVM kept the hlt to itself


@needs_kvm
def test_in_kernel_irqchip_idle_hlt_is_not_the_end():
    with Machine(1 << 20, irqchip="kernel") as m:
        watch = watch_for_final_halt(m, period=0.05)
        load_real_mode(m, STI_HLT)
        m.start(timeout=60)
        while watch.checks < 5 and m.running:
            time.sleep(0.05)
        stop = m.stop()
        assert stop.reason == "interrupted", stop


@needs_kvm
def test_user_irqchip_final_hlt_is_a_hlt_exit():
    with Machine(1 << 20, irqchip="user") as m:
        load_real_mode(m, CLI_HLT)
        stop = m.run(timeout=60)
        assert stop.reason == "halt", stop
        assert m.vcpu.exit_counts()["HLT"] == 1
