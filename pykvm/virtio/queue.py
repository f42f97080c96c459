"""The split virtqueue (VIRTIO 1.1 section 2.6 / 1.2 section 2.7), seen from the device side.

A split virtqueue is three arrays in guest RAM, laid out by the driver, whose addresses the driver
tells the device through the transport (QueueDesc, QueueDriver, QueueDevice):

    descriptor table  size x 16 bytes   { le64 addr; le32 len; le16 flags; le16 next; }
    available ring    6 + 2*size bytes  { le16 flags; le16 idx; le16 ring[size]; le16 used_event; }
    used ring         6 + 8*size bytes  { le16 flags; le16 idx; {le32 id; le32 len} ring[size];
                                          le16 avail_event; }

The driver puts the *head* index of a descriptor chain into avail.ring[avail.idx % size] and then
bumps avail.idx (a free-running 16-bit counter). The device keeps its own `last_avail` counter,
walks each new chain (descriptors linked by `next` while flags has NEXT; device-readable ones first,
then device-writable ones), does the work, and hands the head back in used.ring[used.idx % size]
with the number of bytes it wrote, then bumps used.idx. A descriptor with flags INDIRECT points at a
separate table of descriptors (VIRTIO_F_INDIRECT_DESC), so one ring slot can carry a long chain.

Everything here is written by the guest and trusted by nobody: every index is range-checked, every
chain walk is bounded (a `next` loop or a chain longer than its table ends the walk), and all guest
RAM goes through `GuestMemory`, which refuses addresses outside RAM. A malformed chain is the guest's
mistake: it is counted in `VirtQueue.errors` (and logged, the first time for each kind), and the
chain is *dropped* - its head is returned in the used ring with length 0 so the driver does not
leak the descriptors. A device that can still report an error status in a chain whose data buffer
is bad (virtio-blk) catches `ChainError` from the chain's accessors and writes the status instead.

Shortcuts, admitted: VIRTIO_F_EVENT_IDX is not offered (the Python model never suppresses
notifications - the C path's polling thread sets VRING_USED_F_NO_NOTIFY while it polls,
csrc/virtio_blk_poll.h - and honours only VRING_AVAIL_F_NO_INTERRUPT), and packed virtqueues (VIRTIO_F_RING_PACKED) are not implemented.
"""

from __future__ import annotations

import collections
import logging
import struct
from dataclasses import dataclass, field

from pykvm.devices.state import Stateful
from pykvm.guest_errors import count_guest_error
from pykvm.memory import GuestMemory, GuestMemoryError

log = logging.getLogger("pykvm.virtio")

# struct virtq_desc flags (include/uapi/linux/virtio_ring.h)
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# struct virtq_avail flags: the driver does not want an interrupt for used buffers.
VRING_AVAIL_F_NO_INTERRUPT = 1
# struct virtq_used flags: the device does not want notifications (the Python model never sets it;
# the C path's polling thread does, while it polls: csrc/virtio_blk_poll.h).
VRING_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768
DESC = struct.Struct("<QIHH")      # struct virtq_desc: addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class ChainError(Exception):
    """A descriptor chain the device cannot use (the guest's mistake)."""


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes taken by the descriptor table, available ring and used ring of a queue of `size`."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


@dataclass(slots=True)
class DescChain:
    """One walked descriptor chain: its head index and its buffers, split into the device-readable
    part (`readable`) and the device-writable part (`writable`), each a list of (gpa, length), with
    their total lengths (`readable_len`, `writable_len`, summed by VirtQueue's walk, which is what
    makes chains: build one yourself and you give the lengths too).

    `read` and `write` treat each part as one contiguous byte string; a guest address outside RAM
    or an access past the end of a part raises ChainError (and counts in the queue's errors)."""

    queue: "VirtQueue"
    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)
    readable_len: int = 0
    writable_len: int = 0

    @staticmethod
    def _pieces(segs: list[tuple[int, int]], offset: int, n: int) -> list[tuple[int, int]]:
        if offset < 0 or n < 0:
            raise ChainError("negative offset or length")
        out = []
        for addr, length in segs:
            if n == 0:
                break
            if offset >= length:
                offset -= length
                continue
            take = min(length - offset, n)
            out.append((addr + offset, take))
            offset = 0
            n -= take
        if n:
            raise ChainError("the chain's buffers are too small for the request")
        return out

    def read(self, offset: int = 0, n: int | None = None) -> bytes:
        """`n` bytes (default: all the rest) of the device-readable part, from `offset`."""
        if n is None:
            n = max(self.readable_len - offset, 0)
        segs = self.readable
        if segs and 0 <= offset and 0 < n and offset + n <= segs[0][1]:
            # All in the first buffer (a request header, usually): one bounds-checked read.
            try:
                return self.queue.mem.read(segs[0][0] + offset, n)
            except GuestMemoryError as e:
                self.queue.guest_error("buffer outside RAM", str(e))
                raise ChainError(str(e)) from None
        out = bytearray()
        try:
            for addr, take in self._pieces(self.readable, offset, n):
                out += self.queue.mem.view(addr, take)
        except GuestMemoryError as e:
            self.queue.guest_error("buffer outside RAM", str(e))
            raise ChainError(str(e)) from None
        except ChainError as e:
            self.queue.guest_error("short readable buffer", str(e))
            raise
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` into the device-writable part at `offset`."""
        data = memoryview(data).cast("B")
        segs = self.writable
        if segs:
            # All in the last buffer (a status byte, usually): one bounds-checked write.
            addr, length = segs[-1]
            start = self.writable_len - length
            if start <= offset and 0 < len(data) <= self.writable_len - offset:
                try:
                    self.queue.mem.write(addr + offset - start, data)
                    return
                except GuestMemoryError as e:
                    self.queue.guest_error("buffer outside RAM", str(e))
                    raise ChainError(str(e)) from None
        pos = 0
        try:
            for addr, take in self._pieces(self.writable, offset, len(data)):
                self.queue.mem.write(addr, data[pos:pos + take])
                pos += take
        except GuestMemoryError as e:
            self.queue.guest_error("buffer outside RAM", str(e))
            raise ChainError(str(e)) from None
        except ChainError as e:
            self.queue.guest_error("short writable buffer", str(e))
            raise

    def views(self, writable: bool, offset: int, n: int) -> list[memoryview]:
        """Zero-copy windows onto `n` bytes of the writable (or readable) part from `offset`, in
        order: for handing guest buffers straight to preadv/pwritev. Bounds are checked here, once,
        through GuestMemory.view; a buffer outside RAM raises ChainError (and is counted)."""
        segs = self.writable if writable else self.readable
        try:
            return self.queue.mem.views(self._pieces(segs, offset, n))
        except GuestMemoryError as e:
            self.queue.guest_error("buffer outside RAM", str(e))
            raise ChainError(str(e)) from None
        except ChainError as e:
            self.queue.guest_error("short writable buffer" if writable else "short readable buffer",
                                   str(e))
            raise

    def writable_in_ram(self) -> bool:
        return all(self.queue.mem.contains(a, n) for a, n in self.writable if n)

    def readable_in_ram(self) -> bool:
        return all(self.queue.mem.contains(a, n) for a, n in self.readable if n)


class VirtQueue(Stateful):
    """The device's view of one split virtqueue.

    The transport writes `size`, `desc_addr`, `avail_addr`, `used_addr` and `ready` from the
    driver's register writes, checking them with `check()` before setting `ready`. The device
    model calls `pop()` for each new chain and `add_used()` when done, then asks `needs_interrupt()`.
    `mem` is given by the device when the transport connects it."""

    # The rings live in guest RAM (saved with it); the device side is these indices and addresses.
    STATE = ("size", "ready", "desc_addr", "avail_addr", "used_addr", "last_avail", "next_used",
             "broken", "indirect", "errors")

    def __init__(self, max_size: int):
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.mem: GuestMemory | None = None
        self.indirect = False          # VIRTIO_F_INDIRECT_DESC negotiated
        self.errors = 0
        self.error_kinds: collections.Counter = collections.Counter()
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.last_avail = 0
        self.next_used = 0
        self.broken = False  # the avail index went somewhere impossible: stop until reset
        # Where each ring is in RAM, (region view, offset), checked once for the configuration
        # in the key: the rings are read and written with unpack_from/pack_into, not through
        # a GuestMemory lookup per access. The transport (and tests) set the addresses as plain
        # attributes, so the key is compared on use rather than invalidated on write. The three
        # lookups below are one shape written three times on purpose: each ring access goes
        # through one, several per request, and a shared helper would add a call to each.
        self._desc_key = self._avail_key = self._used_key = None
        self._desc_at = self._avail_at = self._used_at = None

    # ---- guest mistakes ----
    def guest_error(self, kind: str, detail: str = "") -> None:
        self.errors += 1
        count_guest_error(self.error_kinds, kind, log, "virtqueue", detail)

    # ---- set-up ----
    def check(self, mem: GuestMemory) -> str | None:
        """Why this queue's configuration is unusable, or None if it is fine (2.7 alignment:
        descriptor table 16, available ring 2, used ring 4 bytes; all three inside RAM)."""
        n = self.size
        if not 0 < n <= self.max_size or n & (n - 1):
            return f"queue size {n} is not a power of two in 1..{self.max_size}"
        dsz, asz, usz = ring_sizes(n)
        for name, addr, length, align in (("descriptor table", self.desc_addr, dsz, 16),
                                          ("available ring", self.avail_addr, asz, 2),
                                          ("used ring", self.used_addr, usz, 4)):
            if addr % align:
                return f"{name} at {addr:#x} is not {align}-byte aligned"
            if not mem.contains(addr, length):
                return f"{name} at {addr:#x}+{length:#x} is not in RAM"
        return None

    # ---- where the rings are ----
    def _avail_ring(self) -> tuple[memoryview, int]:
        """The available ring's (view, offset); GuestMemoryError if it is not wholly in RAM."""
        key = (self.mem, self.avail_addr, self.size)
        if key != self._avail_key:
            self._avail_at = self.mem.locate(self.avail_addr, 6 + 2 * self.size)
            self._avail_key = key
        return self._avail_at

    def _used_ring(self) -> tuple[memoryview, int]:
        key = (self.mem, self.used_addr, self.size)
        if key != self._used_key:
            self._used_at = self.mem.locate(self.used_addr, 6 + 8 * self.size)
            self._used_key = key
        return self._used_at

    def _desc_table(self) -> tuple[memoryview, int]:
        key = (self.mem, self.desc_addr, self.size)
        if key != self._desc_key:
            self._desc_at = self._locate_table(self.desc_addr, self.size)
            self._desc_key = key
        return self._desc_at

    # ---- the available ring ----
    def avail_idx(self) -> int:
        ram, off = self._avail_ring()
        return _U16.unpack_from(ram, off + 2)[0]

    def avail_flags(self) -> int:
        ram, off = self._avail_ring()
        return _U16.unpack_from(ram, off)[0]

    def has_pending(self) -> bool:
        return self.ready and not self.broken and self.avail_idx() != self.last_avail

    def pop(self) -> DescChain | None:
        """The next well-formed chain the driver made available, or None. Malformed chains on the
        way are counted and returned to the driver with length 0."""
        while (head := self.pop_head()) is not None:
            chain = self.chain_at(head)
            if chain is not None:
                return chain
        return None

    def pop_head(self) -> int | None:
        """pop()'s first half: the head index of the next chain made available (a head outside the
        table is counted and skipped), or None. For a device with a short way for its common
        chain shape (it reads the descriptors through `desc_table()`); `chain_at(head)` is the
        other half, the full walk."""
        while self.ready and not self.broken:
            last, size = self.last_avail, self.size
            try:
                ram, off = self._avail_ring()
            except GuestMemoryError as e:  # check() proved the rings are in RAM; be safe anyway
                self.guest_error("ring outside RAM", str(e))
                self.broken = True
                return None
            avail = _U16.unpack_from(ram, off + 2)[0]
            pending = (avail - last) & 0xFFFF
            if pending == 0:
                return None
            if pending > size:
                # The driver claims more new buffers than the ring holds: the ring is corrupt,
                # and nothing in it can be trusted any more (2.7.13.3: the device MAY set
                # DEVICE_NEEDS_RESET). The owning device notices `broken`.
                self.guest_error("avail index jumped", f"{last} -> {avail}")
                self.broken = True
                return None
            head = _U16.unpack_from(ram, off + 4 + 2 * (last % size))[0]
            self.last_avail = (last + 1) & 0xFFFF
            if head >= size:
                # Not a descriptor: there is nothing we could hand back in the used ring.
                self.guest_error("head index out of range", f"{head} >= {size}")
                continue
            return head
        return None

    def chain_at(self, head: int) -> DescChain | None:
        """The chain at `head` (from pop_head), walked; a malformed one is counted, returned to
        the driver with length 0, and None."""
        try:
            return self._walk(head)
        except ChainError as e:
            self.guest_error("malformed chain", str(e))
            self.add_used(head, 0)
            return None

    def desc_table(self) -> tuple[memoryview, int]:
        """(view, offset) of the descriptor table, bounds-checked as a whole: unpack descriptor i
        at offset + 16 * i. ChainError if it is not in RAM."""
        return self._desc_table()

    def undo_pop(self) -> None:
        """Put the last popped chain back (a device that found it could not use it yet)."""
        self.last_avail = (self.last_avail - 1) & 0xFFFF

    def _walk(self, head: int) -> DescChain:
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        nread = nwrite = 0
        table_len = self.size
        index = head
        budget = table_len           # descriptors left before we call it a loop
        in_indirect = False
        # The table was bounds-checked once (as a whole); then plain unpacks: a request's chain
        # is read without a GuestMemory lookup per descriptor.
        table, base = self._desc_table()
        unpack = DESC.unpack_from
        while True:
            addr, length, flags, nxt = unpack(table, base + DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # 2.7.5.3: zero or more direct descriptors, then one indirect one (not with NEXT).
                if not self.indirect:
                    raise ChainError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if in_indirect:
                    raise ChainError("nested indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError("indirect descriptor with NEXT")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
                    raise ChainError(f"indirect table length {length}")
                table_len = length // DESC_SIZE
                table, base = self._locate_table(addr, table_len)
                index, budget, in_indirect = 0, table_len, True
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
                nwrite += length
            elif writable:
                raise ChainError("device-readable descriptor after a device-writable one")
            else:
                readable.append((addr, length))
                nread += length
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescChain(self, head, readable, writable, nread, nwrite)
            budget -= 1
            if budget == 0:
                raise ChainError(f"chain from head {head} loops or is longer than its table")
            index = nxt
            if index >= table_len:
                raise ChainError(f"next index {index} outside a table of {table_len}")

    def _locate_table(self, addr: int, entries: int) -> tuple[memoryview, int]:
        try:
            return self.mem.locate(addr, DESC_SIZE * entries)
        except GuestMemoryError as e:
            raise ChainError(f"descriptor table at {addr:#x} is not in RAM: {e}") from None

    # ---- the used ring ----
    def add_used(self, head: int, length: int) -> None:
        """Give chain `head` back to the driver, saying the device wrote `length` bytes into it."""
        try:
            ram, off = self._used_ring()
            _USED_ELEM.pack_into(ram, off + 4 + 8 * (self.next_used % self.size), head,
                                 length & 0xFFFFFFFF)
            self.next_used = (self.next_used + 1) & 0xFFFF
            # The entry must be visible before the index that publishes it. Python's stores are
            # plain memory stores in program order and x86 does not reorder stores with stores.
            _U16.pack_into(ram, off + 2, self.next_used)
        except GuestMemoryError as e:
            self.guest_error("ring outside RAM", str(e))
            self.broken = True

    def needs_interrupt(self) -> bool:
        """Does the driver want an interrupt for the used buffers just added?"""
        try:
            return not self.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT
        except GuestMemoryError:
            return True
