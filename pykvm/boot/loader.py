"""Put a Linux kernel, its initrd and command line into guest memory, ready for the first instruction.

The stages, each in its own module:

1. parse: a bzImage's setup header (bzimage.py), or an ELF vmlinux's program headers (elf.py);
2. decompress the bzImage payload on the host (decompress.py) into the ELF vmlinux, or, with
   decompress=False, keep the kernel's own decompressor and load the protected-mode part as is;
3. load the kernel, place the initrd high in low RAM, write the command line (cmdline.py), the zero
   page and e820 map (zeropage.py) and the identity-map page tables (x86/paging.py);
4. hand back a BootPlan: what the vCPU set-up (x86/cpu.py) needs to start the kernel.

Entry, in every case, is the 64-bit boot protocol (boot.rst "64-bit BOOT PROTOCOL"): long mode, flat
4 GiB segments, an identity mapping, RSI = the zero page, interrupts off.

- bzImage, decompress=True (default): the vmlinux's e_entry (startup_64 in head_64.S), the kernel
  proper's own 64-bit entry, which the bzImage decompressor would jump to when done. The zero page
  carries the bzImage's setup header.
- bzImage, decompress=False: the protected-mode kernel at its load address, entry = load + 0x200,
  the decompressor's 64-bit entry (startup_64 in arch/x86/boot/compressed/head_64.S).
- ELF vmlinux: e_entry as above, with a zero page whose header we write ourselves (zeropage.py).
  If the vmlinux also has a PVH note we still choose the 64-bit entry: it is the same CPU set-up as
  the bzImage paths (one mode to get right in cpu.py, not two), the zero page carries everything
  hvm_start_info does, and the PVH entry only leads the kernel to build a zero page from start_info and
  switch to 64-bit mode itself (arch/x86/platform/pvh/enlighten.c) - code that KVM-PVM hosts would
  emulate at CPL0 for no gain. We write start_info anyway and report pvh_entry, so a caller that
  wants PVH (32-bit protected mode, paging off, EBX = start_info_gpa) can have it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Callable, Mapping

from pykvm.boot import elf as elf_mod
from pykvm.boot.bzimage import BzImage, parse_bzimage
from pykvm.boot.cmdline import Cmdline
from pykvm.boot.decompress import decompress_payload
from pykvm.boot.errors import BootError
from pykvm.boot.params import unknown_keys
from pykvm.boot.setup_data import RNG_SEED_BYTES, rng_seed_node
from pykvm.boot.zeropage import build_pvh_start_info, build_zero_page, e820_table
from pykvm.memory import GuestMemory
from pykvm.x86 import layout, paging

PAGE = 0x1000
ENTRY_64_OFFSET = 0x200           # boot.rst: the 64-bit entry is the load address + 0x200
DEFAULT_INITRD_ADDR_MAX = 0x37ffffff   # boot.rst: what initrd_addr_max 0 means (protocol < 2.03)
LINUX_BANNER = b"Linux version "


@dataclass(frozen=True)
class BootPlan:
    """Where the kernel was put and how to start it (64-bit boot protocol unless noted)."""

    entry_rip: int                # RIP: the 64-bit entry point
    zero_page_gpa: int            # RSI: struct boot_params
    stack: int                    # RSP
    cr3: int                      # page-table root: identity map of the first 4 GiB
    cmdline_gpa: int
    kernel_start: int             # guest-physical range the kernel owns (up to its init_size)
    kernel_end: int
    initrd: tuple[int, int] | None    # (gpa, size)
    pvh_entry: int | None         # EIP for the alternative PVH entry (32-bit, paging off), if any
    start_info_gpa: int | None    # EBX for the PVH entry
    description: Mapping[str, object]   # for logs: format, kernel version, compression, addresses


def stage_kernel(kernel: bytes, decompress: bool = True) -> StagedKernel:
    """Stages 1-2 (the module docstring): parse a bzImage or ELF vmlinux and, for a bzImage with
    `decompress`, decompress its payload on the host. Nothing is written to guest memory yet.

    A caller that builds its command line from what the kernel knows (`StagedKernel.unknown_params`)
    stages first, edits its line, then passes the staged kernel to `load_linux`: the kernel is
    parsed and decompressed once, and the text written to the guest is exactly the caller's."""
    kernel = bytes(kernel)
    if elf_mod.is_elf(kernel):
        stage = _stage_elf(elf_mod.parse_elf(kernel), None)
        stage.description.update(format="ELF vmlinux", compression="none")
        return stage
    return _stage_bzimage(parse_bzimage(kernel), decompress)


def load_linux(mem: GuestMemory, kernel: bytes | StagedKernel, cmdline: str | Cmdline,
               initrd: bytes | None = None, decompress: bool = True,
               rng_seed: bool = True, acpi_rsdp: int = 0) -> BootPlan:
    """Load a bzImage or ELF vmlinux, its initrd and command line; return how to enter it.

    `kernel`: the image's bytes, or what `stage_kernel` made of them (then `decompress` was
    stage_kernel's to decide and is not used here). `cmdline` is written as given.

    `acpi_rsdp`: where the VMM put the ACPI RSDP (pykvm.acpi), passed to the kernel in the zero
    page and the PVH start info; 0 = no ACPI tables.

    Raises BootError (one line: the problem and the fix) for an unusable image or too little RAM.
    """
    low_top = _low_ram_top(mem)
    stage = kernel if isinstance(kernel, StagedKernel) else stage_kernel(kernel, decompress)

    text = str(cmdline)
    data = Cmdline(text).encode(stage.cmdline_max)
    initrd_at = None
    if initrd:
        initrd_at = place_initrd(len(initrd), kernel_end=stage.kernel_end,
                                 limit=min(stage.initrd_addr_max + 1, low_top))
    elif stage.kernel_end > low_top:
        raise BootError(f"guest RAM too small: the kernel needs {stage.kernel_start:#x}.."
                        f"{stage.kernel_end:#x} (its image and init_size); give the VM at least "
                        f"{_mib(stage.kernel_end)} MiB")

    stage.load(mem)
    if initrd:
        mem.write(initrd_at, initrd)
    mem.write(layout.CMDLINE, data)
    e820 = e820_table(mem.size)
    initrd_range = (initrd_at, len(initrd)) if initrd else None
    setup_data = 0
    if rng_seed:
        # Entropy for the guest's RNG, fresh from the host (setup_data.py explains why it matters).
        mem.write(layout.SETUP_DATA, rng_seed_node(os.urandom(RNG_SEED_BYTES)))
        setup_data = layout.SETUP_DATA
    mem.write(layout.ZERO_PAGE, build_zero_page(
        stage.header, cmdline_gpa=layout.CMDLINE, cmdline_size=stage.cmdline_max, e820=e820,
        initrd=initrd_range, setup_data=setup_data, acpi_rsdp=acpi_rsdp))
    start_info = None
    if stage.pvh_entry is not None:
        for gpa, blob in build_pvh_start_info(cmdline_gpa=layout.CMDLINE, e820=e820,
                                              initrd=initrd_range, acpi_rsdp=acpi_rsdp).items():
            mem.write(gpa, blob)
        start_info = layout.PVH_START_INFO
    cr3 = paging.write_identity_map(mem)

    desc = dict(stage.description)      # a staged kernel loaded twice keeps its own
    desc.update(entry=f"{stage.entry:#x}", kernel=f"{stage.kernel_start:#x}-{stage.kernel_end:#x}",
                cmdline=text, memory_mib=mem.size >> 20)
    if initrd_range:
        desc["initrd"] = f"{initrd_at:#x}-{initrd_at + len(initrd):#x}"
    if stage.pvh_entry is not None:
        desc["pvh_entry"] = f"{stage.pvh_entry:#x}"
    return BootPlan(entry_rip=stage.entry, zero_page_gpa=layout.ZERO_PAGE, stack=layout.BOOT_STACK,
                    cr3=cr3, cmdline_gpa=layout.CMDLINE, kernel_start=stage.kernel_start,
                    kernel_end=stage.kernel_end, initrd=initrd_range, pvh_entry=stage.pvh_entry,
                    start_info_gpa=start_info, description=MappingProxyType(desc))


def place_initrd(size: int, *, kernel_end: int, limit: int) -> int:
    """The initrd's address: as high as possible with its last byte below `limit`, page aligned,
    above `kernel_end` (boot.rst: "as high as possible below initrd_addr_max"; the kernel's
    init_size area must stay free for it to unpack and start)."""
    floor = _align_up(kernel_end, PAGE)
    addr = (limit - size) & ~(PAGE - 1)
    if size <= 0 or addr < floor:
        need = floor + _align_up(size, PAGE)
        raise BootError(f"guest RAM too small: the kernel needs up to {kernel_end:#x} (init_size) and "
                        f"the initrd {size / layout.MiB:.1f} MiB more below {limit:#x}; give the VM "
                        f"at least {_mib(need)} MiB (the initrd must stay in low RAM below "
                        f"initrd_addr_max and the PCI hole)")
    return addr


@dataclass(frozen=True)
class StagedKernel:
    """What parsing (and decompressing) produced: where the kernel goes and how to write it
    (`stage_kernel`)."""

    entry: int
    kernel_start: int
    kernel_end: int
    header: bytes | None
    cmdline_max: int
    initrd_addr_max: int
    pvh_entry: int | None
    load: Callable[[GuestMemory], object]   # writes the kernel into guest memory
    description: dict
    image: bytes | None = None      # the decompressed kernel, when the VMM has it (boot/params.py)

    def unknown_params(self, keys) -> list[str]:
        """The keys, in order, of parameters this kernel does not know (pykvm.boot.params); none
        for a kernel the guest decompresses itself (decompress=False): the host cannot read that
        one, so it is taken to know them all."""
        return unknown_keys(self.image, keys) if self.image is not None else []


def _stage_elf(vmlinux: elf_mod.ElfKernel, init_size: int | None) -> StagedKernel:
    end = vmlinux.end if init_size is None else max(vmlinux.end, vmlinux.start + init_size)
    at = vmlinux.image.find(LINUX_BANNER)
    version = None
    if at >= 0:
        version = vmlinux.image[at + len(LINUX_BANNER):at + 256].split(b"\0", 1)[0].split(b"\n")[0]
        version = version.decode("ascii", "replace")
    return StagedKernel(entry=vmlinux.entry, kernel_start=vmlinux.start, kernel_end=end,
                        header=None, cmdline_max=layout.CMDLINE_MAX - 1,
                        initrd_addr_max=layout.MMIO_HOLE_START - 1, pvh_entry=vmlinux.pvh_entry,
                        load=lambda mem: elf_mod.load_elf(mem, vmlinux),
                        description={"kernel_version": version, "boot": "64-bit, vmlinux startup_64"},
                        image=vmlinux.image)


def _stage_bzimage(bz: BzImage, decompress: bool) -> StagedKernel:
    hdr = bz.header
    from_header = dict(header=bz.header_bytes,
                       cmdline_max=min(hdr.cmdline_size, layout.CMDLINE_MAX - 1),
                       initrd_addr_max=hdr.initrd_addr_max or DEFAULT_INITRD_ADDR_MAX)
    if decompress:
        compression, vmlinux = decompress_payload(bz.payload)
        try:
            parsed = elf_mod.parse_elf(vmlinux)
        except BootError as e:
            raise BootError(f"the bzImage's {compression} payload did not decompress to a usable "
                            f"vmlinux ({e}); try decompress=False") from None
        stage = replace(_stage_elf(parsed, hdr.init_size), **from_header)
        stage.description["compression"] = compression
    else:
        load = _load_address(bz)
        # The decompressor unpacks at max(load address, LOAD_PHYSICAL_ADDR = pref_address) and
        # needs init_size bytes from there (boot.rst "init_size"); load_linux has checked that this
        # range is RAM before anything is written.
        end = max(load + len(bz.kernel), max(load, hdr.pref_address) + hdr.init_size)
        stage = StagedKernel(entry=load + ENTRY_64_OFFSET, kernel_start=load, kernel_end=end,
                             pvh_entry=None, load=lambda mem: mem.write(load, bz.kernel),
                             description={"boot": "64-bit, bzImage decompressor (load+0x200)",
                                          "compression": "in guest"},
                             **from_header)
    stage.description.update(format="bzImage", protocol=bz.protocol,
                             kernel_version=bz.version_string
                             or stage.description.get("kernel_version"))
    return stage


def _load_address(bz: BzImage) -> int:
    """Where the protected-mode kernel goes for decompress=False (boot.rst "code32_start",
    "pref_address", "kernel_alignment"): a relocatable kernel at its preferred address rounded up to
    kernel_alignment (the decompressor then needs not move itself), otherwise code32_start (1 MiB)."""
    hdr = bz.header
    if hdr.relocatable_kernel:
        return _align_up(max(hdr.pref_address, layout.HIMEM_START), hdr.kernel_alignment)
    load = hdr.code32_start or layout.HIMEM_START
    if load < layout.HIMEM_START:
        raise BootError(f"code32_start {load:#x} at 0x214 lies below 1 MiB, where pykvm keeps its boot "
                        f"structures: the header is corrupt, or use decompress=True")
    return load


def _low_ram_top(mem: GuestMemory) -> int:
    """End of the RAM that starts at 0, capped at the PCI hole: where low-RAM placements must end."""
    for region in mem.regions:
        if region.gpa == 0:
            top = min(region.end, layout.MMIO_HOLE_START)
            if top < layout.CMDLINE + layout.CMDLINE_MAX:
                break
            return top
    raise BootError(f"guest RAM must start at 0 and hold pykvm's boot structures below "
                    f"{layout.CMDLINE + layout.CMDLINE_MAX:#x}: give the VM more memory")


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _mib(value: int) -> int:
    return -(-value // layout.MiB)
