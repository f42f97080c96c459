"""Parse a Linux x86 bzImage: the setup header, the setup code, the protected-mode kernel, its payload.

A bzImage file is three things glued together (Documentation/arch/x86/boot.rst, "THE REAL-MODE KERNEL
HEADER"):

    offset 0            the legacy boot sector (512 bytes, mostly unused today), whose tail holds the
                        first part of the *setup header* at 0x1f1
    offset 0x200        the real-mode *setup code* (setup_sects sectors of 512 bytes), which starts with
                        a 2-byte jump over the rest of the setup header
    (setup_sects+1)*512 the *protected-mode kernel*: the kernel's own decompressor plus, somewhere
                        inside it, the compressed vmlinux (the *payload*, at payload_offset bytes from
                        the start of the protected-mode kernel, payload_length bytes long)

pykvm never runs the real-mode setup code: it uses the 64-bit boot protocol (boot.rst "64-BIT BOOT
PROTOCOL"), which skips straight to the protected-mode kernel with a filled-in zero page. That needs
protocol 2.12 or later (xloadflags with XLF_KERNEL_64, Linux 3.8+).
"""

from __future__ import annotations

from dataclasses import dataclass, make_dataclass

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from pykvm.boot.errors import BootError
from pykvm.x86.layout import SECTOR

HEADER_OFFSET = 0x1f1         # the setup header starts here, in the file and in struct boot_params
HEADER_LIMIT = 0x290          # struct boot_params reserves 0x1f1..0x290 for the header (bootparam.h _pad7)
BOOT_FLAG = 0xAA55
HDRS_MAGIC = b"HdrS"
MIN_PROTOCOL = 0x020c         # 2.12: xloadflags, hence XLF_KERNEL_64 and the 64-bit entry point
DEFAULT_SETUP_SECTS = 4       # boot.rst: "if this field is 0, the real value is 4"
# The boot sector and setup code are loaded together below 0x8000 in the real-mode segment
# (boot.rst "LOADING THE REST OF THE KERNEL"); Linux's arch/x86/boot/tools/build.c caps setup.bin
# at 64 sectors including the boot sector.
MAX_SETUP_SECTS = 63

# loadflags (0x211)
LOADED_HIGH = 0x01            # protected-mode code is loaded at 0x100000 (always, for a bzImage)
KASLR_FLAG = 0x02             # kernel-internal: the decompressor randomized the load address
QUIET_FLAG = 0x20
KEEP_SEGMENTS = 0x40          # obsolete
CAN_USE_HEAP = 0x80           # heap_end_ptr is valid

# xloadflags (0x236)
XLF_KERNEL_64 = 1 << 0                  # has the 64-bit entry point at load address + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1     # kernel, boot_params, cmdline and ramdisk may live above 4 GiB
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6

# struct setup_header, arch/x86/include/uapi/asm/bootparam.h. The comment on each field is its byte
# offset in the file and in the zero page (boot.rst "THE REAL-MODE KERNEL HEADER"), then the protocol
# version that introduced it.
SETUP_HEADER = Struct(
    "setup_sects" / Int8ul,            # 0x1f1  sectors of setup code after the boot sector
    "root_flags" / Int16ul,            # 0x1f2  mount root read-only (obsolete)
    "syssize" / Int32ul,               # 0x1f4  protected-mode code size in 16-byte paragraphs (2.04)
    "ram_size" / Int16ul,              # 0x1f8  obsolete
    "vid_mode" / Int16ul,              # 0x1fa  video mode control
    "root_dev" / Int16ul,              # 0x1fc  default root device (obsolete)
    "boot_flag" / Int16ul,             # 0x1fe  0xAA55
    "jump" / Int16ul,                  # 0x200  jmp short: byte 0x201 + 0x202 is the header's end (2.00)
    "header" / Bytes(4),               # 0x202  "HdrS" (2.00)
    "version" / Int16ul,               # 0x206  boot protocol version, major << 8 | minor (2.00)
    "realmode_swtch" / Int32ul,        # 0x208  boot loader hook (2.00)
    "start_sys_seg" / Int16ul,         # 0x20c  load-low segment 0x1000 (obsolete)
    "kernel_version" / Int16ul,        # 0x20e  version string at 0x200 + this, NUL-terminated (2.00)
    "type_of_loader" / Int8ul,         # 0x210  boot loader identifier; 0xff = "other" (2.00, write)
    "loadflags" / Int8ul,              # 0x211  LOADED_HIGH, KASLR_FLAG, QUIET, CAN_USE_HEAP (2.00)
    "setup_move_size" / Int16ul,       # 0x212  (2.00, obsolete)
    "code32_start" / Int32ul,          # 0x214  32-bit entry, the load address: 0x100000 (2.00)
    "ramdisk_image" / Int32ul,         # 0x218  initrd physical address, low 32 bits (2.00, write)
    "ramdisk_size" / Int32ul,          # 0x21c  initrd size, low 32 bits (2.00, write)
    "bootsect_kludge" / Int32ul,       # 0x220  obsolete
    "heap_end_ptr" / Int16ul,          # 0x224  end of setup heap/stack, minus 0x200 (2.01, write)
    "ext_loader_ver" / Int8ul,         # 0x226  (2.02)
    "ext_loader_type" / Int8ul,        # 0x227  (2.02)
    "cmd_line_ptr" / Int32ul,          # 0x228  command line physical address, low 32 bits (2.02, write)
    "initrd_addr_max" / Int32ul,       # 0x22c  highest address the initrd's last byte may have (2.03)
    "kernel_alignment" / Int32ul,      # 0x230  physical alignment a relocatable kernel needs (2.05)
    "relocatable_kernel" / Int8ul,     # 0x234  may be loaded at any kernel_alignment multiple (2.05)
    "min_alignment" / Int8ul,          # 0x235  log2 of the minimum alignment (2.10)
    "xloadflags" / Int16ul,            # 0x236  XLF_KERNEL_64, XLF_CAN_BE_LOADED_ABOVE_4G, ... (2.12)
    "cmdline_size" / Int32ul,          # 0x238  max command line length, without the NUL (2.06)
    "hardware_subarch" / Int32ul,      # 0x23c  0 = default PC (2.07)
    "hardware_subarch_data" / Int64ul, # 0x240  (2.07)
    "payload_offset" / Int32ul,        # 0x248  compressed vmlinux, from the protected-mode start (2.08)
    "payload_length" / Int32ul,        # 0x24c  its length (2.08)
    "setup_data" / Int64ul,            # 0x250  linked list of struct setup_data (2.09, write)
    "pref_address" / Int64ul,          # 0x258  preferred load address of a relocatable kernel (2.10)
    "init_size" / Int32ul,             # 0x260  bytes the kernel needs from its load address (2.10)
    "handover_offset" / Int32ul,       # 0x264  EFI handover entry (2.11)
    "kernel_info_offset" / Int32ul,    # 0x268  struct kernel_info in the protected-mode part (2.15)
)                                      # 0x26c  end
assert HEADER_OFFSET + SETUP_HEADER.sizeof() == 0x26c

SetupHeader = make_dataclass(
    "SetupHeader", [(sc.name, int) for sc in SETUP_HEADER.subcons], frozen=True)
SetupHeader.__doc__ = "The bzImage setup header's fields, named as in bootparam.h (see SETUP_HEADER)."


@dataclass(frozen=True)
class BzImage:
    """A parsed, validated bzImage."""

    header: SetupHeader       # the setup header's values
    header_bytes: bytes       # the raw header, 0x1f1 up to its end: what a loader copies to the zero page
    setup: bytes              # boot sector + real-mode setup code: the first (setup_sects + 1) * 512 bytes
    kernel: bytes             # the protected-mode kernel: everything after the setup code
    payload: bytes            # the compressed vmlinux: kernel[payload_offset:][:payload_length]
    version_string: str | None  # "6.1.0-13-amd64 (debian-kernel@...) #1 SMP ..." if the image has one

    @property
    def protocol(self) -> str:
        return f"{self.header.version >> 8}.{self.header.version & 0xff:02d}"


def looks_like_bzimage(data: bytes) -> bool:
    """True if `data` has the bzImage magics (it may still fail full validation)."""
    return (len(data) >= 0x206 and data[0x1fe:0x200] == BOOT_FLAG.to_bytes(2, "little")
            and data[0x202:0x206] == HDRS_MAGIC)


def parse_bzimage(data: bytes) -> BzImage:
    """Parse and validate a bzImage; raise BootError with a one-line reason if pykvm cannot boot it."""
    data = bytes(data)
    need = HEADER_OFFSET + SETUP_HEADER.sizeof()
    if len(data) < need:
        raise BootError(f"kernel image is {len(data)} bytes, too short for a Linux setup header "
                        f"(needs at least {need}): the file is truncated or not a kernel")
    hdr = SetupHeader(**{k: v for k, v in SETUP_HEADER.parse(data[HEADER_OFFSET:need]).items()
                         if not k.startswith("_")})

    if hdr.boot_flag != BOOT_FLAG:
        raise BootError(f"no 0xAA55 boot flag at offset 0x1fe (found {hdr.boot_flag:#06x}): "
                        f"not a bzImage; pass an x86 bzImage or an ELF vmlinux")
    if hdr.header != HDRS_MAGIC:
        raise BootError(f"no 'HdrS' magic at offset 0x202 (found {hdr.header!r}): not a bzImage, "
                        f"or a pre-2.00 boot protocol kernel; pass a bzImage from Linux 3.8 or later")
    if hdr.version < MIN_PROTOCOL:
        raise BootError(f"boot protocol {hdr.version >> 8}.{hdr.version & 0xff:02d} is older than "
                        f"2.12: pykvm needs the 64-bit entry (XLF_KERNEL_64); use Linux 3.8 or later")
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise BootError("kernel is not 64-bit capable (xloadflags lacks XLF_KERNEL_64): "
                        "build or fetch an x86_64 kernel")

    setup_sects = hdr.setup_sects or DEFAULT_SETUP_SECTS
    if setup_sects > MAX_SETUP_SECTS:
        raise BootError(f"setup_sects={setup_sects} at 0x1f1 is out of range (1..{MAX_SETUP_SECTS}): "
                        f"the header is corrupt; re-fetch the kernel image")
    setup_size = (setup_sects + 1) * SECTOR
    if len(data) <= setup_size:
        raise BootError(f"kernel image is {len(data)} bytes but setup_sects={setup_sects} says the "
                        f"setup code alone is {setup_size}: the file is truncated; re-fetch it")
    kernel = data[setup_size:]

    end = hdr.payload_offset + hdr.payload_length
    if hdr.payload_length == 0 or end > len(kernel):
        raise BootError(f"payload at {hdr.payload_offset:#x}+{hdr.payload_length:#x} lies outside the "
                        f"{len(kernel):#x}-byte protected-mode kernel: the file is truncated or corrupt")
    if hdr.relocatable_kernel and (hdr.kernel_alignment == 0
                                   or hdr.kernel_alignment & (hdr.kernel_alignment - 1)):
        raise BootError(f"kernel_alignment {hdr.kernel_alignment:#x} at 0x230 is not a power of two: "
                        f"the header is corrupt; re-fetch the kernel image")

    # The jump at 0x200 is "jmp short start_of_setup": its displacement byte (0x201) measures from
    # 0x202 to the first byte after the header, which is how a loader knows how much header to copy.
    header_end = min(0x202 + data[0x201], HEADER_LIMIT)
    return BzImage(
        header=hdr,
        header_bytes=data[HEADER_OFFSET:header_end],
        setup=data[:setup_size],
        kernel=kernel,
        payload=kernel[hdr.payload_offset:end],
        version_string=_version_string(data[:setup_size], hdr.kernel_version),
    )


def _version_string(setup: bytes, kernel_version: int) -> str | None:
    """The kernel's version string: NUL-terminated ASCII at 0x200 + kernel_version (boot.rst)."""
    if not kernel_version:
        return None
    start = 0x200 + kernel_version
    if start >= len(setup):
        return None
    text = setup[start:start + 256].split(b"\0", 1)[0]
    return text.decode("ascii", "replace") or None
