"""Several vCPUs (Machine(cpus=N), --cpus N): threads, stopping, device serialization, bad input.

The KVM tests park every vCPU inside KVM_RUN (vCPU 0 in `cli; hlt`, the others waiting for a SIPI
that never comes) and check that Python keeps running meanwhile - it could not if a thread held the
GIL inside KVM_RUN - and that stop and timeout bring every vCPU thread back."""

import subprocess
import sys
import threading
import time

import pytest

from pykvm.bus import Bus, LockedDevice, Window
from pykvm.halt import HaltWatch, VcpuState
from pykvm.machine import Machine, MachineError, check_cpus
from pykvm.trace import ExitTracer
from pykvm.kvm import exits as E
from pykvm.x86 import cpu, layout

from conftest import default_sigint, needs_kvm

CODE = 0x1000
PARK = bytes([0xFA, 0xF4, 0xEB, 0xFD])        # cli; hlt; jmp back to the hlt


def parked_machine(kvm, cpus: int) -> Machine:
    m = Machine(4 * layout.MiB, kvm=kvm, cpus=cpus)
    m.mem.write(CODE, PARK)
    cpu.setup_real_mode(m.vcpus[0], 0, CODE)
    return m


def vcpu_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pykvm-vcpu")]


# ---- on /dev/kvm ----

@needs_kvm
def test_vcpus_run_on_their_own_threads_with_the_gil_released(kvm):
    with parked_machine(kvm, 3) as m:
        assert [v.index for v in m.vcpus] == [0, 1, 2] and m.vcpu is m.vcpus[0]
        m.start()
        while any(v.thread_id is None for v in m.vcpus):   # every loop has started
            time.sleep(0.01)
        assert sorted(vcpu_threads()) == ["pykvm-vcpu0", "pykvm-vcpu1", "pykvm-vcpu2"]
        # All three threads now sit in KVM_RUN; this thread runs Python regardless.
        assert sum(i * i for i in range(200_000)) == 2666646666700000
        stop = m.stop()
        assert stop.reason == "interrupted"
        assert vcpu_threads() == []
        # The APs never received INIT/SIPI: KVM keeps them parked (KVM_MP_STATE_UNINITIALIZED).
        assert [v.activity() for v in m.vcpus[1:]] == ["waiting-for-sipi"] * 2
        assert m.vcpus[0].activity() == "halted"


@needs_kvm
def test_timeout_stops_every_vcpu(kvm):
    with parked_machine(kvm, 2) as m:
        stop = m.run(timeout=0.5)
        assert stop.reason == "timeout"
        assert vcpu_threads() == []
        assert all(v.thread_id is None for v in m.vcpus)


@needs_kvm
def test_exit_handlers_see_the_vcpu_that_exited(kvm):
    """An AP's exit is handled on the AP's thread, and machine.vcpu there is the AP."""
    seen = []
    with Machine(4 * layout.MiB, kvm=kvm, cpus=2) as m:
        m.mem.write(CODE, bytes([0xE6, 0x80, 0xFA, 0xF4, 0xEB, 0xFD]))   # out 0x80, al; park
        for v in m.vcpus:
            cpu.setup_real_mode(v, 0, CODE)
        # The AP is started by hand here (no guest BSP sends it INIT/SIPI).
        from pykvm.kvm._lib import lib
        m.vcpus[1].set_mp_state(lib.KVM_MP_STATE_RUNNABLE)

        class Post:
            def read(self, offset, size):
                return 0

            def write(self, offset, size, value):
                seen.append((m.vcpu.index, threading.current_thread().name))
                if len(seen) == 2:
                    m.request_stop(m_stop)

        from pykvm.stop import Stop
        m_stop = Stop("exit", 0, "both wrote")
        m.add_pio(0x80, 1, Post())
        assert m.run(timeout=60).reason == "exit"
    assert sorted(seen) == [(0, threading.current_thread().name), (1, "pykvm-vcpu1")]


@needs_kvm
def test_too_many_vcpus_for_kvm_is_a_one_line_error(kvm):
    with pytest.raises(MachineError, match="KVM_CAP_MAX_VCPUS"):
        Machine(4 * layout.MiB, kvm=kvm, cpus=kvm.max_vcpus + 1)


# ---- no KVM needed ----

@pytest.mark.parametrize("cpus, irqchip, message", [
    (0, "kernel", "at least one"), (-3, "kernel", "at least one"), ("2", "kernel", "whole number"),
    (2.0, "kernel", "whole number"), (True, "kernel", "whole number"),
    (2, "user", "runs one vCPU"), (2, "none", "runs one vCPU"),
])
def test_bad_vcpu_counts(cpus, irqchip, message):
    with pytest.raises(MachineError, match=message):
        check_cpus(cpus, irqchip)


def test_good_vcpu_counts():
    assert check_cpus(1, "user") == 1 and check_cpus(16) == 16


class Plain:
    def __init__(self):
        self.log = []

    def read(self, offset, size):
        return len(self.log)

    def write(self, offset, size, value):
        self.log.append(value)


class SelfLocking(Plain):
    thread_safe = True


def test_a_bus_with_a_lock_puts_each_device_behind_it_unless_it_locks_itself():
    bus = Bus("pio", lock=threading.RLock())
    plain, own = Plain(), SelfLocking()
    locked = LockedDevice(Plain(), threading.Lock())
    bus.register(0x10, 4, plain)
    bus.register(0x20, 4, own)
    bus.register(0x30, 4, locked)
    r = bus.find(0x11)
    assert r.device is plain and isinstance(r.target, LockedDevice)
    assert bus.find(0x20).target is own and bus.find(0x30).target is locked
    # The bus's one lock: several ranges often front one model (IDE command/control blocks).
    bus.register(0x40, 1, Window(plain, 3))
    assert bus.find(0x40).target.lock is r.target.lock is bus.lock
    bus.write(0x12, 1, 7)
    assert plain.log == [7] and bus.read(0x10, 1) == 1
    b2 = Bus("pio")                 # a plain bus (one vCPU) wraps nothing
    b2.register(0x10, 4, plain)
    assert b2.find(0x10).target is plain


def test_serialized_device_keeps_one_access_at_a_time():
    class Racy:
        """Fails if two accesses overlap (a read-modify-write split by a thread switch)."""

        def __init__(self):
            self.value = 0
            self.inside = False

        def read(self, offset, size):
            return self.value

        def write(self, offset, size, value):
            assert not self.inside
            self.inside = True
            v = self.value
            time.sleep(0)          # invite a thread switch mid-update
            self.value = v + value
            self.inside = False

    bus = Bus("pio", lock=threading.RLock())
    dev = Racy()
    bus.register(0x40, 1, dev)

    def hammer():
        for _ in range(2000):
            bus.write(0x40, 1, 1)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dev.value == 8000


def test_string_io_goes_through_the_lock_to_the_device():
    class Fifo(Plain):
        def read_string(self, offset, size, count, buf):
            buf[:size * count] = bytes(range(size * count))
            return True

    bus = Bus("pio", lock=threading.RLock())
    bus.register(0x1f0, 8, Fifo())
    buf = memoryview(bytearray(8))
    bus.read_into(0x1f0, 2, buf, 4)
    assert bytes(buf) == bytes(range(8))


def test_ranges_change_as_a_whole_while_other_threads_look_up():
    bus = Bus("mmio", lock=threading.RLock())
    devs = [Plain() for _ in range(8)]
    stop = threading.Event()
    errors = []

    def lookups():
        while not stop.is_set():
            for i in range(8):
                r = bus.find(0x1000 * i + 4)
                if r is not None and r.device is not devs[i]:
                    errors.append((i, r))

    t = threading.Thread(target=lookups)
    t.start()
    for _ in range(300):
        for i, d in enumerate(devs):
            bus.register(0x1000 * i, 0x100, d)
        for i in range(8):
            bus.unregister(0x1000 * i)
    stop.set()
    t.join()
    assert errors == []


class FakeVcpu:
    def __init__(self, index):
        self.index = index


class FakeMachine:
    irqchip = "kernel"

    def __init__(self, n):
        self.vcpus = [FakeVcpu(i) for i in range(n)]
        self.vcpu = self.vcpus[0]
        self.stops = []

    def request_stop(self, stop):
        self.stops.append(stop)


def test_halt_watch_waits_for_every_vcpu():
    """One vCPU halted with interrupts off (an offlined CPU does that) is not the machine's end;
    all of them stuck is."""
    states = {0: VcpuState(halted=True, interrupts_enabled=False),
              1: VcpuState(halted=False, interrupts_enabled=True)}
    watch = HaltWatch(read=lambda vcpu: states[vcpu.index])
    m = FakeMachine(2)
    m.vcpu = m.vcpus[0]
    watch.check(m)
    assert m.stops == []                    # vCPU 1 has not reported yet
    m.vcpu = m.vcpus[1]
    watch.check(m)
    assert m.stops == []                    # vCPU 1 runs
    states[1] = VcpuState(halted=False, interrupts_enabled=False, waiting_for_sipi=True)
    watch.check(m)
    assert m.stops == []                    # one stuck look each is not yet one moment
    m.vcpu = m.vcpus[0]                     # (vCPU 0 may have been woken since its look:
    watch.check(m)                          #  a whole round of looks first, pykvm/halt.py)
    m.vcpu = m.vcpus[1]
    watch.check(m)
    assert [s.reason for s in m.stops] == ["halt"]


def test_trace_names_the_vcpu_when_there_are_several():
    import io
    out = io.StringIO()
    m = FakeMachine(2)
    m.pio = Bus("pio")
    m.mmio = Bus("mmio")
    tracer = ExitTracer(m, out)
    m.vcpu = m.vcpus[1]
    tracer(E.Hlt())
    assert out.getvalue().startswith("[exit 1 cpu1] ")
    one = FakeMachine(1)
    one.pio, one.mmio = Bus("pio"), Bus("mmio")
    out1 = io.StringIO()
    ExitTracer(one, out1)(E.Hlt())
    assert out1.getvalue().startswith("[exit 1] ")


# ---- the CLI ----

@pytest.mark.parametrize("args, message", [
    (["--cpus", "0"], "at least one vCPU"),
    (["--cpus", "two"], "not a whole number"),
    (["--cpus", "1.5"], "not a whole number"),
    (["--cpus", "-1"], "at least one vCPU"),
    (["--cpus", "2", "--irqchip", "user"], "runs one vCPU"),
])
def test_cli_bad_cpus_is_one_line(tmp_path, args, message):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"\0" * 4096)
    p = subprocess.run([sys.executable, "-m", "pykvm.cli", "boot", str(kernel), *args],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr


@needs_kvm
def test_cli_more_cpus_than_kvm_allows_is_one_line(tmp_path, kvm):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"\0" * 4096)
    p = subprocess.run([sys.executable, "-m", "pykvm.cli", "boot", str(kernel), "--cpus",
                        str(kvm.max_vcpus + 1)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "KVM_CAP_MAX_VCPUS" in lines[0], p.stderr


CTRL_C_SCRIPT = r"""
import sys, threading, time
from pykvm.kvm import Kvm
from pykvm.machine import Machine
from pykvm.x86 import cpu, layout
with Machine(4 * layout.MiB, cpus=3) as m:
    m.mem.write(0x1000, bytes([0xFA, 0xF4, 0xEB, 0xFD]))
    cpu.setup_real_mode(m.vcpus[0], 0, 0x1000)
    def ready():
        while any(v.thread_id is None for v in m.vcpus):
            time.sleep(0.01)
        print("parked", flush=True)
    threading.Thread(target=ready, daemon=True).start()
    stop = m.run()
    print("stopped", stop.reason, stop.message,
          sorted(t.name for t in threading.enumerate() if t.name.startswith("pykvm-vcpu")), flush=True)
"""


@needs_kvm
def test_ctrl_c_stops_every_vcpu():
    """SIGINT while all three vCPUs sit in KVM_RUN (the main thread's among them): run() returns
    "interrupted" with every AP thread joined."""
    import signal
    p = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        assert p.stdout.readline().strip() == "parked"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert out.strip() == "stopped interrupted Ctrl-C []", out + err
