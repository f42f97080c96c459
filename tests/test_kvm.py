"""The binding and the Machine on a real /dev/kvm, with guests of a few bytes."""

import subprocess
import sys
import textwrap
import time

import pytest

from pykvm.kvm import KvmError, KvmUnavailable, Kvm, exits as E
from pykvm.machine import Machine, MachineError

from conftest import Recorder, load_real_mode, needs_kvm

# Real-mode guest at 0x1000 (CS=0x100, IP=0): mov dx, 0xe9; mov al, 'A'; out dx, al; hlt
OUT_A_HLT = bytes([0xba, 0xe9, 0x00, 0xb0, 0x41, 0xee, 0xf4])
# mov dx, 0xe9; l: out dx, al; jmp l  (an endless exit storm)
OUT_LOOP = bytes([0xba, 0xe9, 0x00, 0xee, 0xeb, 0xfd])


def test_missing_dev_kvm_is_a_one_line_error(tmp_path):
    with pytest.raises(KvmUnavailable) as e:
        Kvm(str(tmp_path / "kvm"))
    assert "\n" not in str(e.value) and "modprobe" in str(e.value)


def test_a_file_that_is_not_kvm_is_a_one_line_error(tmp_path):
    p = tmp_path / "kvm"
    p.write_text("")
    with pytest.raises(KvmUnavailable, match="not a KVM device") as e:
        Kvm(str(p))
    assert "\n" not in str(e.value)


@needs_kvm
def test_system_queries(kvm):
    assert kvm.api_version == 12
    caps = kvm.capabilities()
    assert caps["USER_MEMORY"] and caps["IRQCHIP"]
    assert kvm.vcpu_mmap_size >= 4096
    assert kvm.supported_cpuid().nent > 0
    assert kvm.max_vcpus >= 1


@needs_kvm
def test_failed_ioctl_names_itself(kvm):
    vm = kvm.create_vm()
    try:
        with pytest.raises(KvmError, match="KVM_SET_USER_MEMORY_REGION"):
            vm.set_user_memory_region(0, 0x123, 0x1000, 0x1000)  # gpa not page aligned
    finally:
        vm.close()


def debugcon_machine(code: bytes):
    """A 1 MiB machine with no interrupt controller running `code` in real mode, and a Recorder
    on port 0xe9 (the debug console the tiny programs here write to)."""
    m = Machine(1 << 20, irqchip="none")
    rec = Recorder()
    m.add_pio(0xe9, 1, rec)
    load_real_mode(m, code)
    return m, rec


@needs_kvm
def test_real_mode_out_and_hlt():
    m, rec = debugcon_machine(OUT_A_HLT)
    with m:
        stop = m.run(timeout=30)
        assert stop.reason == "halt"
        assert rec.data == b"A"
        counts = m.vcpu.exit_counts()
        assert counts["IO"] == 1 and counts["HLT"] == 1


@needs_kvm
def test_vcpu_run_returns_typed_exits():
    with Machine(1 << 20, irqchip="none") as m:
        load_real_mode(m, OUT_A_HLT)
        e = m.vcpu.run()
        assert isinstance(e, E.IoOut) and (e.port, e.size, e.count) == (0xe9, 1, 1)
        assert bytes(e.data) == b"A"
        assert isinstance(m.vcpu.run(), E.Hlt)


@needs_kvm
def test_timeout_stops_a_busy_guest():
    m, rec = debugcon_machine(OUT_LOOP)
    with m:
        stop = m.run(timeout=0.3)
        assert stop.reason == "timeout"
        assert len(rec.data) > 10


@needs_kvm
def test_background_run_and_stop():
    """A vCPU in another thread, busy in the guest, stops on request (kick via signal)."""
    with Machine(2 << 20) as m:
        load_real_mode(m, bytes([0xeb, 0xfe]))   # jmp $: never exits on its own
        m.start()
        time.sleep(0.2)
        assert m.running
        stop = m.stop()
        assert stop.reason == "interrupted"
        assert not m.running


def test_memory_size_checked():
    with pytest.raises(MachineError):
        Machine(12345)


@needs_kvm
def test_irqfd_line_reaches_the_in_kernel_pic():
    """An IrqfdLine pulse sets the in-kernel 8259's request bit (IRR) for its GSI."""
    with Machine(1 << 20) as m:
        line = m.edge_irq_line(5)
        line.set_level(True)
        line.set_level(False)
        assert line.pulses == 1
        # KVM delivers irqfd injections from a work queue: give it a moment.
        for _ in range(100):
            if m.vm.get_irqchip(0).chip.pic.irr & (1 << 5):
                break
            time.sleep(0.01)
        assert m.vm.get_irqchip(0).chip.pic.irr & (1 << 5)


@needs_kvm
def test_a_kick_after_close_is_harmless():
    """Timers, watchdogs and the profiler kick from other threads; one that comes after the
    machine closed must not touch the unmapped kvm_run page."""
    script = textwrap.dedent("""
        import signal, threading
        from pykvm.kvm import KICK_SIGNAL
        from pykvm.machine import Machine
        got = []
        signal.signal(KICK_SIGNAL, lambda *a: got.append(1))
        m = Machine(1 << 20, irqchip="none")
        vcpu = m.vcpu
        vcpu.thread_id = threading.get_ident()    # as if this thread were in KVM_RUN
        m.close()
        t = threading.Thread(target=vcpu.kick)    # a timer's kick, from another thread
        t.start(); t.join()
        vcpu.kick()
        print("fd", vcpu.fd, "signals", len(got))
    """)
    # In a child: a write to the unmapped kvm_run page is a SIGSEGV, which must fail this test,
    # not end the test run.
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.returncode, p.stderr)
    assert p.stdout.split() == ["fd", "-1", "signals", "0"], p.stdout


# mov dx, 0x70; mov al, 0x42; out dx, al; in ax, dx; out dx, ax; hlt
IO_MIX = bytes([0xba, 0x70, 0x00, 0xb0, 0x42, 0xee, 0xed, 0xef, 0xf4])


@needs_kvm
def test_run_decodes_port_io_as_decode_exit_does():
    """Vcpu.run() inlines a copy of Vcpu._decode_io (the hot path); the C loop's path
    (run_fast -> decode_exit) uses the original. With the C loop switched off, both must give
    the same exits for the same guest."""
    from pykvm.kvm.fastpath import FastPath

    def exits(fast):
        with Machine(1 << 20, irqchip="none") as m:
            load_real_mode(m, IO_MIX)
            seen = []
            while True:
                e = m.vcpu.run() if fast is None else m.vcpu.run_fast(fast)
                if isinstance(e, E.IoIn):
                    e.data[:] = b"\x34\x12"
                seen.append((type(e).__name__, getattr(e, "port", None), getattr(e, "size", None),
                             getattr(e, "count", None), bytes(getattr(e, "data", b""))))
                if not isinstance(e, (E.IoOut, E.IoIn)):
                    return seen

    off = FastPath()
    off.regs.enabled = 0
    python, c_path = exits(None), exits(off)
    assert python == c_path
    assert [s[0] for s in python] == ["IoOut", "IoIn", "IoOut", "Hlt"]
    assert python[2][4] == b"\x34\x12"
