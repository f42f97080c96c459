"""Loading a Linux kernel into guest memory (pure Python: nothing here touches /dev/kvm).

1. `bzimage.parse_bzimage` reads and validates the setup header of a bzImage (boot.rst).
2. `decompress.decompress_payload` turns its compressed payload into the ELF vmlinux on the host,
   which on KVM-PVM hosts saves the minute the kernel's own decompressor takes at emulated CPL0.
3. `elf.load_elf` copies an ELF vmlinux's segments to their physical addresses and finds the 64-bit
   entry (e_entry) and the PVH entry (Xen ELF note 18).
4. `cmdline.Cmdline` builds the command line; `zeropage.build_zero_page` the struct boot_params with
   the e820 map (and `build_pvh_start_info` the PVH equivalent); `pykvm.x86.paging` the identity map.
5. `loader.load_linux` does all of the above and returns a `BootPlan`: RIP, RSI, RSP and CR3 for the
   vCPU set-up in `pykvm.x86.cpu`. `loader.stage_kernel` does steps 1-2 alone, for a caller that
   asks the kernel which parameters it knows (`params.py`) before it settles its command line.

Every failure is a `BootError` with a one-line message naming the problem and the fix.
"""

# The public names, loaded on first use (PEP 562): `from pykvm.boot import BootError` must not
# cost a restored VM - which loads no kernel - the bzImage parser, construct and the decompressors
# (tens of milliseconds of a restore's start-up; `python -X importtime` shows them).
_WHERE = {
    "BzImage": "bzimage", "parse_bzimage": "bzimage", "Cmdline": "cmdline",
    "decompress_payload": "decompress", "detect_compression": "decompress",
    "ElfKernel": "elf", "load_elf": "elf", "parse_elf": "elf", "BootError": "errors",
    "BootPlan": "loader", "load_linux": "loader", "place_initrd": "loader",
    "StagedKernel": "loader", "stage_kernel": "loader",
    "E820Entry": "zeropage", "build_pvh_start_info": "zeropage", "build_zero_page": "zeropage",
    "e820_table": "zeropage",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value         # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
