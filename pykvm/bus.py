"""Buses: map an address (I/O port or guest-physical MMIO address) to the device that claims it.

x86 has two address spaces for devices. *Port I/O* (the `in`/`out` instructions, 64 Ki ports) is
where the legacy PC devices live: the UART at 0x3f8, the PIT at 0x40, the PIC at 0x20/0xa0. *MMIO* is
ordinary physical addresses that are not RAM: a guest load or store there makes KVM exit with
KVM_EXIT_MMIO. Both are served by the same `Bus`: a sorted range map; a device is registered at a
base with a length and then only ever sees offsets from its base.

A device is any object with

    read(offset, size) -> int
    write(offset, size, value) -> None

An access nobody claims is the guest's business (probing for hardware that is absent is normal):
reads return all ones, as on a real ISA bus with nothing driving it, writes are dropped, and both are
counted in `unclaimed`.

Two small adapters sit between a bus and a device: `LockedDevice` (a device also fed from another
thread) and `Window` (one register of a device reached at a port of its own).

**Several vCPUs.** With more than one vCPU, exits reach the bus from several threads at once. A bus
made with a `lock` (Machine gives its port and MMIO buses one shared re-entrant lock when it has
more than one vCPU) puts each device it registers behind that lock (`LockedDevice`), so the device
models see one access at a time, as on one CPU. One lock for all of them, not one per
registration: one model is often reached through several ranges (an IDE channel's command and
control blocks, the i8042's two ports, a PCI function's config space on the port bus and its BARs
on the MMIO bus), and the GIL lets one thread run Python at a time anyway, so finer locks would
buy little. A device that keeps itself consistent says so with a class attribute
`thread_safe = True` and is registered as it is (LockedDevice: the UART, behind the lock it shares
with the terminal's input; the ACPI PM registers, which lock their own state). KVM's in-kernel
PIC, PIT, IOAPIC and local APICs never reach these buses. The range table itself is replaced as a
whole on every (un)registration (PCI BARs move while other vCPUs run), so a lookup never sees half
of a change.
"""

from __future__ import annotations

import bisect
import threading

from .record import FrozenRecord


class Device:
    """What a bus device is (any object with these two methods will do; nothing checks the type)."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


UNCLAIMED_LOG_MAX = 1024


class BusOverlapError(ValueError):
    """Two devices claimed the same addresses (a VMM configuration bug)."""


class Range(FrozenRecord):
    """`length` addresses from `base` claimed by `device` (as registered) under `name`; accesses go
    to `target`: the device itself, or its LockedDevice."""

    __slots__ = ("base", "length", "device", "name", "target")

    def __init__(self, base: int, length: int, device: object, name: str,
                 target: object = None) -> None:
        for k, v in (("base", base), ("length", length), ("device", device), ("name", name),
                     ("target", device if target is None else target)):
            object.__setattr__(self, k, v)

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """A range map from addresses to devices."""

    def __init__(self, name: str, lock=None):
        self.name = name
        self.lock = lock    # several vCPUs: held around each access to a device that is not thread_safe
        # (bases, ranges): sorted starts and their Ranges, swapped as one value on every change.
        self._table: tuple[list[int], list[Range]] = ([], [])
        self.unclaimed = 0
        # address -> count, for the exit tracer: the first UNCLAIMED_LOG_MAX distinct addresses;
        # accesses to further ones are only counted in unclaimed_other (a guest sweeping the whole
        # MMIO space must not grow the VMM by a dict entry per address).
        self.unclaimed_log: dict[int, int] = {}
        self.unclaimed_other = 0
        # Addresses seen before -> (device, base): a guest hits the same few ports over and over,
        # and a dict lookup is cheaper than a bisection on every exit.
        self._hits: dict[int, tuple[object, int]] = {}

    def register(self, base: int, length: int, device: Device, name: str | None = None) -> None:
        if length <= 0:
            raise ValueError("a device range needs a positive length")
        target = device
        if self.lock is not None and not getattr(device, "thread_safe", False):
            target = LockedDevice(device, self.lock)
        new = Range(base, length, device, name or type(device).__name__, target)
        bases, ranges = self._table
        i = bisect.bisect_left(bases, base)
        for neighbour in ranges[max(i - 1, 0):i + 1]:
            if neighbour.base < new.end and new.base < neighbour.end:
                raise BusOverlapError(
                    f"{self.name}: {new.name} at {base:#x}+{length:#x} overlaps "
                    f"{neighbour.name} at {neighbour.base:#x}+{neighbour.length:#x}")
        self._table = (bases[:i] + [base] + bases[i:], ranges[:i] + [new] + ranges[i:])
        self._hits.clear()

    def unregister(self, base: int) -> None:
        bases, ranges = self._table
        i = bisect.bisect_left(bases, base)
        if i == len(bases) or bases[i] != base:
            raise KeyError(f"{self.name}: nothing registered at {base:#x}")
        self._table = (bases[:i] + bases[i + 1:], ranges[:i] + ranges[i + 1:])
        self._hits.clear()

    def find(self, addr: int) -> Range | None:
        bases, ranges = self._table
        i = bisect.bisect_right(bases, addr) - 1
        if i >= 0:
            r = ranges[i]
            if addr < r.end:
                return r
        return None

    def ranges(self) -> list[Range]:
        return list(self._table[1])

    def _miss(self, addr: int) -> None:
        self.unclaimed += 1
        log = self.unclaimed_log
        if addr in log:
            log[addr] += 1
        elif len(log) < UNCLAIMED_LOG_MAX:
            log[addr] = 1
        else:
            self.unclaimed_other += 1

    def _lookup(self, addr: int) -> tuple[object, int] | None:
        hit = self._hits.get(addr)
        if hit is None:
            r = self.find(addr)
            if r is None:
                return None
            if len(self._hits) >= 4096:    # bounded: a guest may sweep a large MMIO range
                self._hits.clear()
            hit = self._hits[addr] = (r.target, r.base)
        return hit

    # read() and write() are on every exit's path: each inlines the same cache lookup (a
    # documented fast copy of `_lookup`'s hit case; a helper call would cost every exit).
    def read(self, addr: int, size: int) -> int:
        try:
            device, base = self._hits[addr]
        except KeyError:
            hit = self._lookup(addr)
            if hit is None:
                self._miss(addr)
                return (1 << (8 * size)) - 1
            device, base = hit
        return device.read(addr - base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        try:
            device, base = self._hits[addr]
        except KeyError:
            hit = self._lookup(addr)
            if hit is None:
                self._miss(addr)
                return
            device, base = hit
        device.write(addr - base, size, value)

    # String and repeated I/O (`rep outsb`, `rep insw`): KVM hands us `count` items of `size` bytes
    # in one buffer; the bus loops, so devices only ever see single accesses. One exception: a
    # device with a FIFO-like data port (the ATA data register: a sector is one `rep insw` of 256
    # words) may offer `read_string(offset, size, count, buf) -> bool` and
    # `write_string(offset, size, data) -> bool`, which move the whole buffer in one call or return
    # False to get the loop. Word by word, a sector cost ~350 us of Python; at once, a few us.
    def read_into(self, addr: int, size: int, buf: memoryview, count: int) -> None:
        hit = self._lookup(addr)
        if hit is not None:
            string = getattr(hit[0], "read_string", None)
            if string is not None and string(addr - hit[1], size, count, buf):
                return
        for i in range(count):
            buf[i * size:(i + 1) * size] = self.read(addr, size).to_bytes(size, "little")

    def write_from(self, addr: int, size: int, buf: memoryview, count: int) -> None:
        hit = self._lookup(addr)
        if hit is not None:
            string = getattr(hit[0], "write_string", None)
            if string is not None and string(addr - hit[1], size, buf[:size * count]):
                return
        for i in range(count):
            self.write(addr, size, int.from_bytes(buf[i * size:(i + 1) * size], "little"))


class LockedDevice:
    """A device behind a lock: one register access at a time.

    Two uses. The UART (pykvm/pc.py) shares its lock with the terminal thread that calls `feed`, so
    input and register accesses keep the device's state consistent (uncontended, the lock costs
    well under a microsecond). A bus with a `lock` (several vCPUs) puts every device that is not
    `thread_safe` behind that lock, so several vCPU threads reach the models one at a time.
    Either way the lock serializes all callers, so a bus needs no second one (thread_safe). The
    string I/O shortcuts (read_string/write_string) go through the same lock."""

    thread_safe = True

    def __init__(self, device, lock: threading.Lock | None = None):
        self.device = device
        self.lock = lock if lock is not None else threading.Lock()

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            return self.device.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.device.write(offset, size, value)

    def read_string(self, offset: int, size: int, count: int, buf) -> bool:
        string = getattr(self.device, "read_string", None)
        if string is None:
            return False
        with self.lock:
            return string(offset, size, count, buf)

    def write_string(self, offset: int, size: int, data) -> bool:
        string = getattr(self.device, "write_string", None)
        if string is None:
            return False
        with self.lock:
            return string(offset, size, data)


class Window:
    """A device register reached at another port: accesses land at `offset` within the device."""

    def __init__(self, device, offset: int):
        self.device = device
        self.offset = offset

    def read(self, offset: int, size: int) -> int:
        return self.device.read(self.offset + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.device.write(self.offset + offset, size, value)
