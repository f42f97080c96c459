"""A gdb stub for pykvm guests: `pykvm boot ... --gdb tcp::1234 [--gdb-wait]`, then
`gdb vmlinux -ex 'target remote :1234'`.

- stub.py         the server: the listening socket, one gdb session at a time, the packet loop
- packets.py      the remote protocol's framing ($...#cs, acks, escapes, Ctrl-C)
- commands.py     each command gdb sends and the reply
- vcpus.py        holding and releasing the vCPUs (all-stop), KVM_SET_GUEST_DEBUG, the exits
                  that stop them (single-step, int3, debug registers, Ctrl-C)
- breakpoints.py  int3s planted in guest memory, DR0-DR3 for hardware breakpoints and watchpoints
- usertraps.py    KVM-PVM: user-mode (CPL3) breakpoints and steps, caught in the guest's own
                  #BP/#DB handlers and unwound
- debugregs.py    DR7's encoding
- memory.py       guest memory by virtual (KVM_TRANSLATE) or physical address
- registers.py    the target description (x86-64 or i386, with segment and control registers) and
                  register images read from the vCPU
- address.py      --gdb tcp::PORT, and GdbError
"""

from .address import GdbError, parse_address
from .stub import GdbStub

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
