"""Guest-physical memory: the one door into guest RAM.

A guest's "physical" RAM is ordinary host memory that the VMM maps and then hands to KVM with
KVM_SET_USER_MEMORY_REGION (one *slot* per contiguous range). The guest's page tables translate its
virtual addresses to these guest-physical addresses (GPAs); the VMM sees the same bytes through its own
mapping. Every device model and loader reads and writes guest memory through `GuestMemory.read` /
`GuestMemory.write` (or `view` for zero-copy), which bounds-check the GPA range, so a guest that hands
us a bad pointer gets an error rather than us touching host memory outside guest RAM.

Three backends: `MmapBackend` (an anonymous mapping, what KVM is given), `FileBackend` (a file
mapped copy-on-write: a restored snapshot's RAM) and `BytesBackend` (a bytearray, for unit tests
with no /dev/kvm).
"""

from __future__ import annotations

import mmap

from .record import Record


class GuestMemoryError(Exception):
    """A guest-physical access outside RAM (usually a guest's mistake: callers log and count it)."""


class BytesBackend:
    """Guest RAM in a bytearray: for tests that need no KVM."""

    def __init__(self, size: int):
        self.buf = bytearray(size)
        self.size = size

    def view(self) -> memoryview:
        return memoryview(self.buf)

    def close(self) -> None:
        pass


class MmapBackend:
    """Guest RAM in an anonymous mapping that KVM can be given (see Vm.set_user_memory_region).

    MAP_PRIVATE with MADV_HUGEPAGE lets the host back guest RAM with 2 MiB pages where it can, which
    matters on shadow-paging hosts (KVM-PVM) as much as with EPT/NPT: fewer TLB misses for the guest.

    KVM maps a guest 2 MiB page with a host 2 MiB page only if the slot's guest-physical and host
    addresses agree modulo 2 MiB (virt/kvm/kvm_main.c, kvm_alloc_memslot_metadata: otherwise every
    large page of the slot is disallowed, and the guest runs on 4 KiB pages with huge pages behind
    them). Linux places large anonymous mappings on a 2 MiB boundary only when their length is a
    multiple of 2 MiB (6.7 and later; older kernels not even then), so with huge pages the mapping
    is made 2 MiB longer when it comes out unaligned and the RAM starts at the first boundary in it
    (guest RAM regions start at 2 MiB multiples: 0, 4 GiB). bench/tlb_reach.py measures which page
    size the guest gets (bench/README.md: on KVM-PVM, THP-backed RAM is walked as 2 MiB pages
    either way; the alignment is for KVM with EPT/NPT, where the rule above holds).
    """

    HUGE_PAGE = 2 << 20

    def __init__(self, size: int, hugepages: bool = True):
        self.size = size
        self.mmap = self._map(size)
        self.offset = 0
        if hugepages and self._address() % self.HUGE_PAGE:
            self.mmap.close()
            self.mmap = self._map(size + self.HUGE_PAGE)
            self.offset = -self._address() % self.HUGE_PAGE
        if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.mmap.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass  # transparent huge pages disabled on this host: 4 KiB pages it is
        self._whole = memoryview(self.mmap)
        self._view = self._whole[self.offset:self.offset + size]

    @staticmethod
    def _map(size: int) -> mmap.mmap:
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def _address(self) -> int:
        from .kvm.vm import host_address     # the binding owns every pointer
        return host_address(self.mmap)

    def view(self) -> memoryview:
        return self._view

    def address(self) -> int:
        """Host virtual address of guest RAM, for KVM_SET_USER_MEMORY_REGION."""
        return self._address() + self.offset

    def close(self) -> None:
        self._view.release()
        self._whole.release()
        try:
            self.mmap.close()
        except BufferError:
            pass  # someone still holds a view; the mapping goes when they do


class FileBackend(MmapBackend):
    """Guest RAM mapped copy-on-write from a file (a snapshot's RAM section, pykvm/snapshot/).

    mmap(MAP_PRIVATE) of `size` bytes at `offset` (a multiple of the page size): nothing is read
    up front, a page comes from the page cache when the guest (or KVM on its behalf) first touches
    it, and the first write to a page gives this process its own copy. So many VMs restored from
    one file share every page none of them has written, and the file never changes. (Page-cache
    pages are 4 KiB here: the 2 MiB alignment MmapBackend makes for huge pages would buy nothing.)"""

    def __init__(self, fd: int, offset: int, size: int):
        self.size = size
        self.mmap = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self.offset = 0
        self._whole = memoryview(self.mmap)
        self._view = self._whole


class Region(Record):
    """A contiguous range of guest-physical RAM: [gpa, gpa + size)."""

    __slots__ = ("gpa", "size", "backend")

    def __init__(self, gpa: int, size: int, backend: BytesBackend | MmapBackend) -> None:
        self.gpa = gpa
        self.size = size
        self.backend = backend

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Guest-physical RAM made of non-overlapping regions, with bounds-checked access.

    An access must fall entirely inside one region: guest RAM is not contiguous across the PCI hole
    below 4 GiB, and a DMA that runs off the end of a region is the guest's mistake.
    """

    def __init__(self, regions: list[Region]):
        self.regions = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(self.regions, self.regions[1:]):
            if a.end > b.gpa:
                raise ValueError(f"memory regions overlap at {b.gpa:#x}")
        self._views = [r.backend.view() for r in self.regions]
        # (first gpa, end, whole-region view) per region: what `_find` scans on every access.
        self._spans = [(r.gpa, r.end, v) for r, v in zip(self.regions, self._views)]

    @classmethod
    def for_test(cls, size: int, gpa: int = 0) -> "GuestMemory":
        return cls([Region(gpa, size, BytesBackend(size))])

    @property
    def size(self) -> int:
        """Total bytes of RAM (not the highest address)."""
        return sum(r.size for r in self.regions)

    def _find(self, gpa: int, size: int) -> tuple[memoryview, int]:
        if size < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest access {gpa:#x}+{size}")
        for start, end, view in self._spans:
            if start <= gpa and gpa + size <= end:
                return view, gpa - start
        raise GuestMemoryError(f"guest-physical range {gpa:#x}..{gpa + size:#x} is not RAM")

    def locate(self, gpa: int, size: int) -> tuple[memoryview, int]:
        """(view of the whole region holding [gpa, gpa + size), offset of gpa in it): for code that
        checks a range once and then reads and writes inside it with struct.unpack_from/pack_into
        (a virtqueue's rings), without a lookup or a new view per access."""
        return self._find(gpa, size)

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy window onto guest RAM; stays valid while the memory lives."""
        view, off = self._find(gpa, size)
        return view[off:off + size]

    def views(self, ranges: list[tuple[int, int]]) -> list[memoryview]:
        """`view` of each (gpa, size) in `ranges`, in order: a scatter-gather list's buffers in
        one call (GuestMemoryError if any of them is not wholly in RAM)."""
        spans = self._spans
        out = []
        for gpa, size in ranges:
            # _find's check, inlined for the hot path (a request's data buffers); what it does not
            # take goes to _find itself, which refuses it.
            for start, end, view in spans:
                if start <= gpa and gpa + size <= end and size >= 0:
                    out.append(view[gpa - start:gpa - start + size])
                    break
            else:
                view, off = self._find(gpa, size)     # raises: no region holds it
                out.append(view[off:off + size])
        return out

    def spans(self):
        """(first gpa, whole-region view) per region: for C code that gets the same regions and
        checks its accesses as `_find` does (csrc/guest_mem.h)."""
        return [(start, view) for start, _, view in self._spans]

    def read(self, gpa: int, size: int) -> bytes:
        view, off = self._find(gpa, size)
        return bytes(view[off:off + size])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        view, off = self._find(gpa, len(data))
        view[off:off + len(data)] = data

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        view, off = self._find(gpa, size)
        view[off:off + size] = bytes([byte]) * size

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def contains(self, gpa: int, size: int = 1) -> bool:
        return any(r.gpa <= gpa and gpa + size <= r.end for r in self.regions)

    def close(self) -> None:
        for v in self._views:
            v.release()
        for r in self.regions:
            r.backend.close()
