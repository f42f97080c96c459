"""Loading a Linux kernel into guest memory (pure Python: nothing here touches /dev/kvm).

1. `bzimage.parse_bzimage` reads and validates the setup header of a bzImage (boot.rst).
2. `decompress.decompress_payload` turns its compressed payload into the ELF vmlinux on the host,
   which on KVM-PVM hosts saves the minute the kernel's own decompressor takes at emulated CPL0.
3. `elf.load_elf` copies an ELF vmlinux's segments to their physical addresses and finds the 64-bit
   entry (e_entry) and the PVH entry (Xen ELF note 18).
4. `cmdline.Cmdline` builds the command line; `zeropage.build_zero_page` the struct boot_params with
   the e820 map (and `build_pvh_start_info` the PVH equivalent); `pykvm.x86.paging` the identity map.
5. `loader.load_linux` does all of the above and returns a `BootPlan`: RIP, RSI, RSP and CR3 for the
   vCPU set-up in `pykvm.x86.cpu`.

Every failure is a `BootError` with a one-line message naming the problem and the fix.
"""

from pykvm.boot.bzimage import BzImage, parse_bzimage
from pykvm.boot.cmdline import Cmdline
from pykvm.boot.decompress import decompress_payload, detect_compression
from pykvm.boot.elf import ElfKernel, load_elf, parse_elf
from pykvm.boot.errors import BootError
from pykvm.boot.loader import BootPlan, load_linux, place_initrd
from pykvm.boot.zeropage import E820Entry, build_pvh_start_info, build_zero_page, e820_table

__all__ = [
    "BootError", "BootPlan", "BzImage", "Cmdline", "E820Entry", "ElfKernel", "build_pvh_start_info",
    "build_zero_page", "decompress_payload", "detect_compression", "e820_table", "load_elf",
    "load_linux", "parse_bzimage", "parse_elf", "place_initrd",
]
