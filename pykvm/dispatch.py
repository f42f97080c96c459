"""Exit dispatch: what each typed exit (pykvm.kvm.exits) does to a Machine.

`handle_exit(machine, exit)` returns None to go on running, or a `Stop`. It is a plain function over
plain values: tests call it with made-up exits and a stand-in machine, and this module loads without
the compiled KVM binding. `Machine.run` looks up the same `_HANDLERS` table inline (one call less
per exit); there is no second copy of any handler.
"""

from __future__ import annotations

import time

from collections.abc import Callable

from .kvm import exits as E
from .stop import Stop, StopReason

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing (pykvm/record.py)
if TYPE_CHECKING:
    from .machine import Machine

def _io_out(m: Machine, e: E.IoOut) -> Stop | None:
    if e.count == 1:
        data = e.data
        m.pio.write(e.port, e.size, data[0] if e.size == 1 else int.from_bytes(data, "little"))
    else:
        m.pio.write_from(e.port, e.size, e.data, e.count)
    return None


def _io_in(m: Machine, e: E.IoIn) -> Stop | None:
    if e.count == 1:
        e.data[:] = m.pio.read(e.port, e.size).to_bytes(e.size, "little")
    else:
        m.pio.read_into(e.port, e.size, e.data, e.count)
    return None


def _mmio_write(m: Machine, e: E.MmioWrite) -> Stop | None:
    m.mmio.write(e.addr, len(e.data), int.from_bytes(e.data, "little"))
    return None


def _mmio_read(m: Machine, e: E.MmioRead) -> Stop | None:
    n = len(e.data)
    e.data[:] = m.mmio.read(e.addr, n).to_bytes(n, "little")
    return None


def _hlt(m: Machine, e: E.Hlt) -> Stop | None:
    # With the Python PIC, `hlt` with interrupts enabled means "wait for the next interrupt":
    # KVM leaves the waiting to us. With interrupts off, or no interrupt controller at all,
    # nothing can wake the CPU: the guest is done.
    chip = getattr(m, "userirq", None)
    if chip is not None and m.vcpu.kvm_run.if_flag:
        # The guest is idle until then. With the in-kernel irqchip KVM does this wait inside
        # KVM_RUN; here it is the VMM's, so it is counted apart (Stats.seconds_halted) to keep
        # "time outside KVM_RUN" meaning the VMM's own work under either irqchip.
        t = time.monotonic()
        chip.wait_for_interrupt()
        m.stats.seconds_halted += time.monotonic() - t
        return None
    return Stop(StopReason.HALT, message="the guest executed hlt with no interrupt to wait for")


def _shutdown(m: Machine, e: E.Shutdown) -> Stop | None:
    return Stop(StopReason.SHUTDOWN, message="triple fault: the guest's CPU reset itself")


def _system_event(m: Machine, e: E.SystemEvent) -> Stop | None:
    if e.kind is E.SystemEventKind.RESET:
        return Stop(StopReason.RESET, message="the guest asked for a reset")
    if e.kind is E.SystemEventKind.CRASH:
        return Stop(StopReason.PANIC, message="the guest reported a crash")
    return Stop(StopReason.POWEROFF, message="the guest powered off")


def _internal_error(m: Machine, e: E.InternalError) -> Stop | None:
    m.last_internal_error = e
    for handler in m.internal_error_handlers:
        if handler(m, e):
            return None
    return Stop(StopReason.ERROR, message=f"KVM internal error, suberror {e.suberror}, data "
                                 + " ".join(f"{d:#x}" for d in e.data))


def _fail_entry(m: Machine, e: E.FailEntry) -> Stop | None:
    return Stop(StopReason.ERROR, message=f"VM entry failed, hardware reason {e.reason:#x}")


def _ignore(m: Machine, e: E.Exit) -> Stop | None:
    return None


def _interrupted(m: Machine, e: E.Interrupted) -> Stop | None:
    for handler in getattr(m, "interrupted_handlers", ()):
        handler(m)
    return None


def _debug(m: Machine, e: E.Debug) -> Stop | None:
    handler = getattr(m, "debug_handler", None)
    if handler is None:
        return _unknown(m, e)
    return handler(m, e)


def _unknown(m: Machine, e: E.Exit) -> Stop | None:
    m.stats.guest_errors["unhandled exit"] += 1
    return Stop(StopReason.ERROR, message=f"unhandled exit {e!r}")


_HANDLERS: dict[type, Callable[[Machine, E.Exit], Stop | None]] = {
    E.IoOut: _io_out,
    E.IoIn: _io_in,
    E.MmioWrite: _mmio_write,
    E.MmioRead: _mmio_read,
    E.Hlt: _hlt,
    E.Shutdown: _shutdown,
    E.SystemEvent: _system_event,
    E.InternalError: _internal_error,
    E.FailEntry: _fail_entry,
    E.Interrupted: _interrupted,
    E.IrqWindowOpen: _ignore,
    E.Debug: _debug,
}


def handle_exit(machine: Machine, exit: E.Exit) -> Stop | None:
    """Dispatch one exit. Returns None to go on running, or a Stop."""
    return _HANDLERS.get(type(exit), _unknown)(machine, exit)
