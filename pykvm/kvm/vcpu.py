"""`Vcpu`: a virtual CPU's file descriptor (from KVM_CREATE_VCPU).

A vCPU has registers we can read and write between runs (general-purpose, "special" segment and
control registers, FPU/SSE, MSRs, CPUID table, pending events) and one verb: KVM_RUN, which enters the
guest and returns at the next exit. The reason for the exit is left in `struct kvm_run`, a region of
memory shared with the kernel that we mmap from the vCPU fd once.
"""

from __future__ import annotations

import os
import threading
import time

import errno
import mmap
import struct

from ._lib import ffi, ioctl, ioctl_int, ioctl_new, lib
from .errors import KvmError
from . import exits as E

EINTR = errno.EINTR
EAGAIN = errno.EAGAIN

# Layout of the hot part of struct kvm_run, with offsets taken from the compiled header.
_run = lib.pykvm_run
_run_fast = lib.pykvm_run_fast
_FAST_FLUSH = lib.PYKVM_FAST_FLUSH
_FAST_VBLK = lib.PYKVM_FAST_VBLK
_EXIT_IO, _EXIT_MMIO, _IO_OUT = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO, lib.KVM_EXIT_IO_OUT
_OFF_UNION = ffi.offsetof("struct kvm_run", "io")
_OFF_MMIO_DATA = ffi.offsetof("struct kvm_run", "mmio", "data")
_IO = struct.Struct("=BBHIQ")     # direction, size, port, count, data_offset
# x86 KVM always puts port-I/O data in the page after struct kvm_run (asm/kvm.h).
_PIO_DATA = lib.KVM_PIO_PAGE_OFFSET * mmap.PAGESIZE
_MMIO = struct.Struct("=Q8xIB")   # phys_addr, (data[8]), len, is_write
# The port-I/O exit values are built field by field on the hot path: in CPython 3.11, calling a
# class whose __init__ is Python code goes through type_call -> slot_tp_init -> a new frame, ~1,800
# instructions per exit (callgrind); object.__new__ and four slot stores cost ~500.
_IoOut, _IoIn = E.IoOut, E.IoIn
_new = object.__new__
_SYSTEM_EVENT_KINDS = {lib.KVM_SYSTEM_EVENT_SHUTDOWN: E.SystemEventKind.SHUTDOWN,
                       lib.KVM_SYSTEM_EVENT_RESET: E.SystemEventKind.RESET,
                       lib.KVM_SYSTEM_EVENT_CRASH: E.SystemEventKind.CRASH}


def _check_layout() -> None:
    """The struct formats above must agree with the kernel header, field by field."""
    io = [ffi.offsetof("struct kvm_run", "io", f) - _OFF_UNION
          for f in ("direction", "size", "port", "count", "data_offset")]
    mmio = [ffi.offsetof("struct kvm_run", "mmio", f) - _OFF_UNION
            for f in ("phys_addr", "len", "is_write")]
    assert _OFF_UNION == ffi.offsetof("struct kvm_run", "mmio")
    assert io == [0, 1, 2, 4, 8] and _IO.size == 16, io
    assert mmio == [0, 16, 20] and _OFF_MMIO_DATA - _OFF_UNION == 8, mmio


_check_layout()


def _tsc_hz(vcpu) -> float:
    """The rate of the TSC that csrc/kvm_helpers.h counts time in. KVM reports it for the vCPU
    (KVM_GET_TSC_KHZ: the host's rate unless TSC scaling was asked for, which pykvm never does);
    without that ioctl, measure it against CLOCK_MONOTONIC over 20 ms."""
    try:
        return vcpu.tsc_khz() * 1e3
    except KvmError:
        t0, c0 = time.monotonic_ns(), lib.pykvm_rdtsc()
        time.sleep(0.02)
        return (lib.pykvm_rdtsc() - c0) / ((time.monotonic_ns() - t0) / 1e9)


class Vcpu:
    def __init__(self, vm, fd: int, index: int, mmap_size: int):
        self.vm = vm
        self.fd = fd
        self.index = index
        self._mmap_size = mmap_size
        ptr = lib.pykvm_mmap_vcpu(fd, mmap_size)
        if ptr == ffi.NULL:
            os.close(fd)
            raise KvmError(ffi.errno, "mmap(vcpu fd)")
        self._run_ptr = ptr
        self.kvm_run = ffi.cast("struct kvm_run *", ptr)
        self._page = ffi.buffer(ptr, mmap_size)  # the same bytes, for slicing exit data
        self._mv = memoryview(self._page)
        # Windows onto the port-I/O data page for the usual 1-8 byte accesses, made once: the data
        # of every such exit lives there, so a new slice per exit would only cost time.
        self._pio_views = [self._mv[_PIO_DATA:_PIO_DATA + n] for n in range(9)]
        self.thread_id: int | None = None       # the thread inside run(), for kick()
        # kick() comes from other threads (timers, watchdogs, the profiler) and writes to the
        # kvm_run page: close() takes this lock to unmap it, so a late kick never touches freed
        # memory. kvm_stats() takes it too, for the statistics file close() closes.
        self._kick_lock = threading.Lock()
        # The C side of run() (csrc/kvm_helpers.h): fd and kvm_run page in one struct, which also
        # keeps the accounting: TSC ticks inside KVM_RUN, and exits by KVM_EXIT_* reason.
        self._c = ffi.new("struct pykvm_vcpu *")
        self._c.fd = fd
        self._c.run = self.kvm_run
        self._fast = None
        self._stats = None          # pykvm.kvm.stats.KvmStats once asked for, False if unsupported
        self._tsc_hz = _tsc_hz(self)

    @property
    def seconds_in_run(self) -> float:
        return self._c.ticks_in_run / self._tsc_hz

    def exit_counts(self) -> dict[str, int]:
        """Exits so far by reason name ("IO", "MMIO", "HLT", ...)."""
        names = {getattr(lib, n): n[len("KVM_EXIT_"):] for n in dir(lib)
                 if n.startswith("KVM_EXIT_") and not n.startswith("KVM_EXIT_IO_")}
        return {names.get(i, str(i)): int(c)
                for i, c in enumerate(self._c.exits) if c}

    def kvm_stats(self) -> dict[str, int]:
        """KVM's own counters for this vCPU (pykvm.kvm.stats), {} where the kernel has no
        KVM_GET_STATS_FD (before 5.14). The file is opened once and kept until close().
        Any thread may ask (`vm.stats` from a test while the vCPU runs): the lock that close()
        takes keeps two first callers from opening two files, and a read from a closed one."""
        with self._kick_lock:
            if self.fd < 0:
                return {}
            if self._stats is None:
                from .stats import open_stats
                try:
                    self._stats = open_stats(self.fd)
                except KvmError:
                    self._stats = False
            return self._stats.read() if self._stats else {}

    def close(self) -> None:
        with self._kick_lock:
            if self.fd < 0:
                return
            if self._stats:
                self._stats.close()
            for view in self._pio_views:
                view.release()
            self._mv.release()
            self._page = None
            lib.pykvm_munmap(self._run_ptr, self._mmap_size)
            os.close(self.fd)
            self.fd = -1

    # ---- the run loop's one ioctl ----
    def run(self) -> E.Exit:
        """Enter the guest until the next exit and return it as a typed value.

        Call from one thread at a time; set `thread_id` to that thread if others will `kick()` it."""
        reason = _run(self._c)
        if reason == _EXIT_IO:
            # The hottest exit: a copy of _decode_io, inlined here to save a call per exit. Keep
            # the two alike (tests/test_kvm.py runs both on the same guest).
            direction, size, port, count, off = _IO.unpack_from(self._mv, _OFF_UNION)
            n = size * count
            data = self._pio_views[n] if n <= 8 and off == _PIO_DATA else self._mv[off:off + n]
            e = _new(_IoOut if direction == _IO_OUT else _IoIn)
            e.port = port
            e.size = size
            e.count = count
            e.data = data
            return e
        if reason < 0:
            if reason == -EINTR or reason == -EAGAIN:
                self.kvm_run.immediate_exit = 0
                return E.Interrupted()
            raise KvmError(-reason, "KVM_RUN")
        return self.decode_exit(reason)

    def run_fast(self, fast) -> E.Exit:
        """Like run(), but the C loop in csrc/fastpath.h answers the hot port-I/O exits it can
        (see pykvm.kvm.fastpath.FastPath) and only the others come back as typed exits."""
        if fast is not self._fast:
            self._c.fast = fast.regs
            self._fast = fast
        regs, c = fast.regs, self._c
        while True:
            reason = _run_fast(c)
            if regs.uart_out_len or regs.debug_out_len:
                fast.drain()       # before any other exit is handled: output stays in order
            if reason >= 0:
                return self.decode_exit(reason)
            if reason == _FAST_FLUSH:
                continue
            if reason == _FAST_VBLK:
                fast.finish_virtio_blk()
                continue
            if reason == -EINTR or reason == -EAGAIN:
                self.kvm_run.immediate_exit = 0
                return E.Interrupted()
            raise KvmError(-reason, "KVM_RUN")

    def decode_exit(self, reason: int) -> E.Exit:
        # The hot exits (port I/O, MMIO) are decoded with one struct.unpack_from each: every cffi
        # attribute access costs ~100 ns, and on VT-x hardware the whole exit round trip is ~1-2 us.
        page = self._mv
        if reason == _EXIT_IO:
            return self._decode_io()
        if reason == _EXIT_MMIO:
            addr, length, is_write = _MMIO.unpack_from(page, _OFF_UNION)
            data = page[_OFF_MMIO_DATA:_OFF_MMIO_DATA + length]
            return E.MmioWrite(addr, data) if is_write else E.MmioRead(addr, data)
        return self._decode_slow(reason)

    def _decode_io(self) -> E.Exit:
        """A port-I/O exit (struct kvm_run.io): `data` is a window on the bytes KVM put, or wants,
        in the page after struct kvm_run; views of up to 8 bytes at the usual offset are reused."""
        direction, size, port, count, off = _IO.unpack_from(self._mv, _OFF_UNION)
        n = size * count
        data = self._pio_views[n] if n <= 8 and off == _PIO_DATA else self._mv[off:off + n]
        e = _new(_IoOut if direction == _IO_OUT else _IoIn)
        e.port = port
        e.size = size
        e.count = count
        e.data = data
        return e

    def _decode_slow(self, reason: int) -> E.Exit:
        run = self.kvm_run
        if reason == lib.KVM_EXIT_HLT:
            return E.Hlt()
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return E.Shutdown()
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            i = run.internal
            return E.InternalError(i.suberror, tuple(i.data[k] for k in range(min(i.ndata, 16))),
                                   i.suberror == lib.KVM_INTERNAL_ERROR_EMULATION)
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            t = run.system_event.type
            return E.SystemEvent(_SYSTEM_EVENT_KINDS.get(t, E.SystemEventKind.OTHER), t)
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            return E.FailEntry(run.fail_entry.hardware_entry_failure_reason)
        if reason == lib.KVM_EXIT_IRQ_WINDOW_OPEN:
            return E.IrqWindowOpen()
        if reason == lib.KVM_EXIT_INTR:
            return E.Interrupted()
        if reason == lib.KVM_EXIT_DEBUG:
            d = run.debug.arch
            return E.Debug(d.exception, d.pc, d.dr6, d.dr7)
        return E.Unknown(reason)

    def kick(self) -> None:
        """Make a KVM_RUN in another thread return soon (E.Interrupted).

        `immediate_exit` makes the next KVM_RUN return at once with EINTR; the signal knocks a
        KVM_RUN already in progress out of the guest. Together they leave no window in which the kick
        is lost (Documentation/virt/kvm/api.rst, "immediate_exit"). pykvm.machine installs a no-op
        handler for KICK_SIGNAL. A kick after close() does nothing."""
        with self._kick_lock:
            if self.fd < 0:
                return
            self.kvm_run.immediate_exit = 1
            if self.thread_id is not None and self.thread_id != threading.get_ident():
                import signal
                try:
                    signal.pthread_kill(self.thread_id, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    # ---- registers ----
    def get_regs(self):
        return ioctl_new(self.fd, "KVM_GET_REGS", "struct kvm_regs *")

    def set_regs(self, regs) -> None:
        ioctl(self.fd, lib.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self):
        return ioctl_new(self.fd, "KVM_GET_SREGS", "struct kvm_sregs *")

    def set_sregs(self, sregs) -> None:
        ioctl(self.fd, lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self):
        return ioctl_new(self.fd, "KVM_GET_FPU", "struct kvm_fpu *")

    def set_fpu(self, fpu) -> None:
        ioctl(self.fd, lib.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE: the vCPU's FPU/SSE/AVX state in the XSAVE layout (SDM Vol. 1, 13.4)."""
        xs = ffi.new("struct kvm_xsave *")
        ioctl(self.fd, lib.KVM_GET_XSAVE, xs, "KVM_GET_XSAVE")
        return ffi.buffer(xs.region)[:]

    def set_xsave(self, image: bytes) -> None:
        xs = ffi.new("struct kvm_xsave *")
        ffi.memmove(xs.region, image, min(len(image), ffi.sizeof(xs.region)))
        ioctl(self.fd, lib.KVM_SET_XSAVE, xs, "KVM_SET_XSAVE")

    def tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the frequency of this vCPU's time-stamp counter, in kHz."""
        return ioctl_int(self.fd, lib.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, idx in enumerate(indices):
            msrs.entries[i].index = idx
        n = ioctl(self.fd, lib.KVM_GET_MSRS, msrs, "KVM_GET_MSRS")
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> None:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(values), "entries": len(values)})
        for i, (idx, val) in enumerate(values.items()):
            msrs.entries[i].index = idx
            msrs.entries[i].data = val
        n = ioctl(self.fd, lib.KVM_SET_MSRS, msrs, "KVM_SET_MSRS")
        if n != len(values):
            bad = list(values)[n]
            raise KvmError(22, f"KVM_SET_MSRS (MSR {bad:#x} refused)")

    def set_cpuid(self, cpuid) -> None:
        """KVM_SET_CPUID2 with a `struct kvm_cpuid2 *` (see pykvm.x86.cpu.setup_cpuid)."""
        ioctl(self.fd, lib.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_vcpu_events(self):
        return ioctl_new(self.fd, "KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events *")

    def set_vcpu_events(self, ev) -> None:
        ioctl(self.fd, lib.KVM_SET_VCPU_EVENTS, ev, "KVM_SET_VCPU_EVENTS")

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Queue a CPU exception (e.g. #BP, vector 3) for delivery at the next KVM_RUN."""
        ev = self.get_vcpu_events()
        ev.exception.injected = 1
        ev.exception.nr = vector
        ev.exception.has_error_code = 0 if error_code is None else 1
        ev.exception.error_code = error_code or 0
        ev.flags = 0  # don't touch NMI/SIPI/shadow state
        self.set_vcpu_events(ev)

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: inject an external interrupt (only without the in-kernel irqchip)."""
        irq = ffi.new("struct kvm_interrupt *", {"irq": vector})
        ioctl(self.fd, lib.KVM_INTERRUPT, irq, "KVM_INTERRUPT")

    def translate(self, linear: int) -> int | None:
        """KVM_TRANSLATE: walk the guest's page tables for a linear address; None if unmapped."""
        tr = ffi.new("struct kvm_translation *", {"linear_address": linear})
        ioctl(self.fd, lib.KVM_TRANSLATE, tr, "KVM_TRANSLATE")
        return tr.physical_address if tr.valid else None

    # ---- the rest of the vCPU's state, for snapshots (pykvm/snapshot/) ----
    def get_xcrs(self):
        """KVM_GET_XCRS: the extended control registers (XCR0 says which XSAVE components are on)."""
        return ioctl_new(self.fd, "KVM_GET_XCRS", "struct kvm_xcrs *")

    def set_xcrs(self, xcrs) -> None:
        ioctl(self.fd, lib.KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")

    def get_lapic(self):
        """KVM_GET_LAPIC: the local APIC's 1 KiB register page, as the guest's MMIO sees it
        (Intel SDM Vol. 3, 11.4.1; needs the in-kernel irqchip)."""
        return ioctl_new(self.fd, "KVM_GET_LAPIC", "struct kvm_lapic_state *")

    def set_lapic(self, lapic) -> None:
        ioctl(self.fd, lib.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: runnable, halted, waiting for INIT/SIPI, ... (KVM_MP_STATE_*)."""
        return ioctl_new(self.fd, "KVM_GET_MP_STATE", "struct kvm_mp_state *").mp_state

    def activity(self) -> str:
        """KVM_GET_MP_STATE decoded for code outside the binding: "halted", "waiting-for-sipi"
        (an AP before INIT/SIPI), "runnable", or "other" (stopped, check-stop, ...)."""
        mp = self.get_mp_state()
        if mp == lib.KVM_MP_STATE_HALTED:
            return "halted"
        if mp in (lib.KVM_MP_STATE_UNINITIALIZED, lib.KVM_MP_STATE_INIT_RECEIVED):
            return "waiting-for-sipi"
        return "runnable" if mp == lib.KVM_MP_STATE_RUNNABLE else "other"

    def set_mp_state(self, state: int) -> None:
        mp = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        ioctl(self.fd, lib.KVM_SET_MP_STATE, mp, "KVM_SET_MP_STATE")

    def get_debugregs(self):
        """KVM_GET_DEBUGREGS: DR0-3, DR6, DR7."""
        return ioctl_new(self.fd, "KVM_GET_DEBUGREGS", "struct kvm_debugregs *")

    def set_debugregs(self, dr) -> None:
        ioctl(self.fd, lib.KVM_SET_DEBUGREGS, dr, "KVM_SET_DEBUGREGS")

    def complete_io(self) -> None:
        """Finish an exit's instruction without running on: after a port-I/O or MMIO exit, KVM
        completes the instruction (stores an `in`'s data, advances RIP) only at the next KVM_RUN.
        With `immediate_exit` set, that KVM_RUN does just this and returns EINTR at once
        (Documentation/virt/kvm/api.rst, "immediate_exit"): the registers are then whole."""
        self.kvm_run.immediate_exit = 1
        try:
            reason = _run(self._c)
        finally:
            self.kvm_run.immediate_exit = 0
        if reason >= 0:        # an exit before entering the guest (nothing left to complete)
            return
        if reason not in (-EINTR, -EAGAIN):
            raise KvmError(-reason, "KVM_RUN")

    def set_guest_debug(self, control: int, debugreg: tuple[int, ...] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: `control` is KVM_GUESTDBG_* bits (ENABLE, SINGLESTEP, USE_SW_BP,
        USE_HW_BP, ...); `debugreg` up to 8 values for DR0-DR3, (DR4, DR5 unused), DR6, DR7 with
        USE_HW_BP. 0 turns debugging off. Takes effect at the next KVM_RUN."""
        dbg = ffi.new("struct kvm_guest_debug *")
        dbg.control = control
        for i, value in enumerate(debugreg[:8]):
            dbg.arch.debugreg[i] = value
        ioctl(self.fd, lib.KVM_SET_GUEST_DEBUG, dbg, "KVM_SET_GUEST_DEBUG")

    def set_single_step(self, enable: bool) -> None:
        self.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP if enable else 0)


# A real-time signal nobody else uses, sent to a thread inside KVM_RUN to make it return.
import signal as _signal  # noqa: E402

KICK_SIGNAL = _signal.SIGRTMIN + 3
