"""Identity-map page tables for entering 64-bit mode.

Long mode cannot be entered with paging off (Intel SDM Vol. 3A, "Initializing IA-32e Mode" in the
processor-initialization chapter: IA-32e mode becomes active when CR0.PG is set with EFER.LME = 1), so before the first 64-bit instruction there must be page tables,
and the simplest useful ones map every address to itself. The Linux 64-bit boot protocol asks for
exactly that: "the range with setup_header.init_size from start address of loaded kernel and zero page
and command line buffer get ident mapping" (boot.rst "64-bit BOOT PROTOCOL"). The kernel builds its own
tables soon after.

4-level paging (SDM Vol. 3A, 4.5 "4-Level Paging and 5-Level Paging") walks a linear address as

    bits 47:39 -> PML4 entry -> bits 38:30 -> PDPT entry -> bits 29:21 -> PD entry -> [bits 20:0 offset]

when the PD entry has PS=1 and so maps a 2 MiB page (SDM 4.5, Figure "Linear-Address Translation to
a 2-MByte Page using 4-Level Paging"). We use one
PML4 entry, four PDPT entries and 4 x 512 PD entries: 2048 pages of 2 MiB = the first 4 GiB, which
covers RAM below the PCI hole and the MMIO hole itself (the hole's memory type comes from MTRRs/PAT,
not from these entries; under KVM an access to it exits to the VMM whatever the type).

Entry format (SDM 4.5, the tables "Format of a PML4 Entry (PML4E) that References a Page-Directory-
Pointer Table", "Format of a Page-Directory-Pointer-Table Entry (PDPTE) that References a Page
Directory" and "Format of a Page-Directory Entry that Maps a 2-MByte Page"):

    bit 0   P     present
    bit 1   R/W   writes allowed (if 0 at any level, writes fault)
    bit 2   U/S   user-mode (CPL3) accesses allowed; must be 1 at *every* level for CPL3 to reach a page
    bit 3   PWT, bit 4 PCD: cache control (0: write-back, as the MTRRs allow)
    bit 5   A     accessed (set by the CPU)
    bit 6   D     dirty (leaf entries only; set by the CPU)
    bit 7   PS    page size: in a PD entry, 1 = this entry maps a 2 MiB page (must be 0 in a PML4E)
    bit 8   G     global (leaf only; needs CR4.PGE)
    51:12   physical address of the next table (51:21 for a 2 MiB page: it must be 2 MiB aligned)
    bit 63  XD    execute-disable (needs EFER.NXE)
"""

from __future__ import annotations

from array import array

from pykvm.memory import GuestMemory
from pykvm.x86 import layout

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_USER = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_PS = 1 << 7           # in a PD entry: maps a 2 MiB page
PTE_GLOBAL = 1 << 8
PTE_XD = 1 << 63

PAGE_SIZE = 0x1000
ENTRIES = 512             # 4 KiB table / 8-byte entries
HUGE_PAGE = 2 * layout.MiB
IDENTITY_MAP_SIZE = 4 * layout.GiB
PD_COUNT = IDENTITY_MAP_SIZE // (ENTRIES * HUGE_PAGE)   # 4 page directories, one per GiB


def identity_map_tables(user: bool = False) -> dict[int, bytes]:
    """The identity-map tables as {guest-physical address: 4 KiB page}; nothing is written.

    `user=True` sets U/S at every level, so code at CPL3 (e.g. a firmware test program on a KVM-PVM
    host, where CPL3 runs natively) can use the same identity mapping.
    """
    flags = PTE_PRESENT | PTE_WRITABLE | (PTE_USER if user else 0)

    pml4 = array("Q", bytes(PAGE_SIZE))
    pml4[0] = layout.PDPT | flags                 # PML4[0] covers 0..512 GiB

    pdpt = array("Q", bytes(PAGE_SIZE))
    for i in range(PD_COUNT):
        pdpt[i] = (layout.PD + i * PAGE_SIZE) | flags   # PDPT[i] covers GiB i

    pages = {layout.PML4: pml4.tobytes(), layout.PDPT: pdpt.tobytes()}
    for i in range(PD_COUNT):
        pd = array("Q", ((i * ENTRIES + j) * HUGE_PAGE | flags | PTE_PS for j in range(ENTRIES)))
        pages[layout.PD + i * PAGE_SIZE] = pd.tobytes()
    return pages


def write_identity_map(mem: GuestMemory, user: bool = False) -> int:
    """Write tables identity-mapping the first 4 GiB with 2 MiB pages; return the CR3 value (PML4).

    Uses layout.PML4, layout.PDPT and the four pages from layout.PD. CR3's low 12 bits (PWT, PCD,
    PCID) are left 0.
    """
    for gpa, page in identity_map_tables(user).items():
        mem.write(gpa, page)
    return layout.PML4


def translate(mem: GuestMemory, cr3: int, vaddr: int) -> int | None:
    """Walk 4-level tables in guest memory: the physical address for `vaddr`, or None if unmapped.

    Handles 1 GiB, 2 MiB and 4 KiB pages; ignores permission bits. For tests and debugging.
    """
    table = cr3 & ~0xfff
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = mem.read_int(table + ((vaddr >> shift) & 0x1ff) * 8, 8)
        if not entry & PTE_PRESENT:
            return None
        addr = entry & 0x000f_ffff_ffff_f000
        if shift == 12 or (level in (1, 2) and entry & PTE_PS):
            mask = (1 << shift) - 1
            return (addr & ~mask) | (vaddr & mask)
        table = addr
    return None  # unreachable: the 4 KiB level always returns
