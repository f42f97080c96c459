"""VM exits as typed values.

Each time KVM_RUN returns, the vCPU has stopped for a reason KVM could not handle in the kernel and
wrote it into the shared `struct kvm_run` page (`exit_reason` plus a union of per-reason details).
`Vcpu.run()` decodes that page into one of the values below, so the rest of pykvm (and its tests)
deal with plain Python objects: `IoOut(port=0x3f8, size=1, count=1, data=b"A")`.

Exits that expect an answer (a port read, an MMIO read) carry `data`: a writable window into the
`kvm_run` page. The handler fills it in, and KVM completes the guest's `in`/`mov` with those bytes on
the next KVM_RUN. In tests, `data` is just a `memoryview` of a `bytearray`.

Where KVM reports a kind as a number from its header (a system event's type, an internal error's
suberror), `Vcpu` also decodes it into the plain values here (`SystemEventKind`,
`InternalError.emulation`), so that the exit handlers and the pure half of pykvm.pvm need no
compiled binding: this module imports nothing from it.
"""

from __future__ import annotations

import enum

from ..record import Record


class Exit(Record):
    """Base class of every exit value: a record whose fields are its `__slots__` (pykvm/record.py
    says why these are written out by hand rather than made by `dataclasses`)."""

    __slots__ = ()


class PortIo(Exit):
    """An `in`/`out` (or the string forms `ins`/`outs`) on an I/O port: `count` items of `size` bytes
    at `port`, in `data` (KVM's port-I/O page). The two directions below are its only kinds."""

    __slots__ = ("port", "size", "count", "data")

    def __init__(self, port: int, size: int, count: int, data: memoryview) -> None:
        self.port = port
        self.size = size
        self.count = count
        self.data = data

    def __repr__(self) -> str:  # the port in hex and the bytes, not "<memory at 0x...>"
        return (f"{type(self).__qualname__}(port={self.port:#x}, size={self.size}, "
                f"count={self.count}, data={bytes(self.data)!r})")


class IoOut(PortIo):
    """`out`/`outs`: the guest wrote `count` items of `size` bytes to `port`; `data` holds them."""

    __slots__ = ()


class IoIn(PortIo):
    """`in`/`ins`: fill `data` (count * size bytes) with what the guest reads from `port`."""

    __slots__ = ()


class Mmio(Exit):
    """An access to guest-physical `addr` that is not RAM, of len(data) bytes. Like PortIo, the two
    directions below are its only kinds."""

    __slots__ = ("addr", "data")

    def __init__(self, addr: int, data: memoryview) -> None:
        self.addr = addr
        self.data = data

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}(addr={self.addr:#x}, data={bytes(self.data)!r})"


class MmioWrite(Mmio):
    """A store to guest-physical `addr` that is not RAM; `data` holds the stored bytes."""

    __slots__ = ()


class MmioRead(Mmio):
    """A load from guest-physical `addr` that is not RAM: fill `data` (len(data) bytes)."""

    __slots__ = ()


class Hlt(Exit):
    """`hlt` with no in-kernel irqchip to wait for an interrupt (or interrupts disabled)."""

    __slots__ = ()


class Shutdown(Exit):
    """A triple fault (or `ud2`-style shutdown): a real PC resets here."""

    __slots__ = ()


class SystemEventKind(enum.Enum):
    """KVM_SYSTEM_EVENT_SHUTDOWN, _RESET, _CRASH; anything else (a newer kernel's kinds) is OTHER."""

    SHUTDOWN = "shutdown"
    RESET = "reset"
    CRASH = "crash"
    OTHER = "other"


class SystemEvent(Exit):
    """PSCI-style shutdown/reset/crash: `kind` decoded from `type`, the raw KVM_SYSTEM_EVENT_*."""

    __slots__ = ("kind", "type")

    def __init__(self, kind: SystemEventKind, type: int = -1) -> None:
        self.kind = kind
        self.type = type


class InternalError(Exit):
    """KVM could not go on. `suberror` KVM_INTERNAL_ERROR_EMULATION means its instruction emulator
    met an instruction it does not know (`emulation` is then True): on KVM-PVM hosts, pykvm.pvm
    completes some of those."""

    __slots__ = ("suberror", "data", "emulation")

    def __init__(self, suberror: int, data: tuple[int, ...], emulation: bool = False) -> None:
        self.suberror = suberror
        self.data = data
        self.emulation = emulation


class FailEntry(Exit):
    """VM entry failed: the register state is invalid for the hardware (a VMM bug)."""

    __slots__ = ("reason",)

    def __init__(self, reason: int) -> None:
        self.reason = reason


class IrqWindowOpen(Exit):
    """The guest can take an interrupt now (asked for with request_interrupt_window)."""

    __slots__ = ()


class Interrupted(Exit):
    """KVM_RUN returned EINTR: a signal arrived (Ctrl-C, a timeout, a kick from another thread)."""

    __slots__ = ()


class Debug(Exit):
    """A single-step or breakpoint exit (KVM_SET_GUEST_DEBUG): `exception` 1 (#DB: a step or a
    hardware breakpoint, DR6 says which) or 3 (#BP: an int3 with KVM_GUESTDBG_USE_SW_BP); `pc` the
    guest's linear RIP as KVM reports it (struct kvm_debug_exit_arch)."""

    __slots__ = ("exception", "pc", "dr6", "dr7")

    def __init__(self, exception: int, pc: int, dr6: int = 0, dr7: int = 0) -> None:
        self.exception = exception
        self.pc = pc
        self.dr6 = dr6
        self.dr7 = dr7


class Unknown(Exit):
    """An exit pykvm does not decode; `reason` is the raw KVM_EXIT_* number."""

    __slots__ = ("reason",)

    def __init__(self, reason: int) -> None:
        self.reason = reason
