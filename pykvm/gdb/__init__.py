"""A gdb stub for pykvm guests: `pykvm boot ... --gdb tcp::1234 [--gdb-wait]`, then
`gdb vmlinux -ex 'target remote :1234'`.

- packets.py    the remote protocol's framing ($...#cs, acks, escapes, Ctrl-C)
- registers.py  the target description (x86-64 or i386, with segment and control registers) and
                register images read from the vCPU
- debugregs.py  DR0-DR3/DR7 for hardware breakpoints and watchpoints
- stub.py       the server: holds and releases vCPUs, breakpoints, single-step, memory by virtual
                or physical address
"""

from .stub import GdbError, GdbStub, parse_address

# x86-64 Linux maps its image at __START_KERNEL_map + physical address (arch/x86/include/asm/
# page_64_types.h; Documentation/arch/x86/x86_64/mm.rst: "kernel text mapping, mapped to physical
# address 0", 1 GiB at most, KERNEL_IMAGE_SIZE). pykvm loads vmlinux at its p_paddr with no KASLR
# (the test kernel has RANDOMIZE_BASE off), so this holds from the first instruction on.
START_KERNEL_MAP = 0xFFFFFFFF80000000
KERNEL_IMAGE_SIZE = 1 << 30


def linux_text_mapping(vaddr: int) -> int | None:
    """The physical address behind a Linux kernel-image virtual address (an `early_translate`
    for GdbStub): what the kernel's page tables will say once it has built them."""
    if START_KERNEL_MAP <= vaddr < START_KERNEL_MAP + KERNEL_IMAGE_SIZE:
        return vaddr - START_KERNEL_MAP
    return None


__all__ = ["GdbStub", "GdbError", "parse_address", "linux_text_mapping"]
