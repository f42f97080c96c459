"""Build tiny kernel images for tests: an x86-64 ELF "vmlinux" and a bzImage wrapping it.

They follow the real formats closely enough for every parser in pykvm.boot (and the kernel's own
boot protocol) to accept them: a bzImage with a protocol 2.15 setup header and a payload compressed
the way arch/x86/boot/compressed/Makefile does it (including the 4-byte size_append trailer), and an
ELF with PT_LOAD segments at physical addresses and an optional PVH note. The code inside is whatever
bytes the caller gives: a firmware test can put a 64-bit program at the entry point and run it through
the same `load_linux` path as Linux.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct

from pykvm.boot.bzimage import HEADER_OFFSET, SETUP_HEADER, XLF_KERNEL_64, XLF_CAN_BE_LOADED_ABOVE_4G
from pykvm.boot.decompress import LZ4_LEGACY_BLOCK, LZ4_LEGACY_MAGIC
from pykvm.boot.elf import XEN_ELFNOTE_PHYS32_ENTRY

KERNEL_MAP = 0xffffffff80000000      # __START_KERNEL_map: vmlinux's virtual = physical + this


def make_elf(segments: list[tuple[int, bytes, int]], entry: int, *, pvh_entry: int | None = None,
             machine: int = 62, elfclass: int = 2, banner: bytes | None = None) -> bytes:
    """An ELF64 executable with one PT_LOAD per (paddr, data, memsz), entry = `entry` (physical).

    `pvh_entry` adds a PT_NOTE with the Xen PHYS32_ENTRY note (8-byte descriptor, as Linux writes it).
    `banner` (e.g. b"Linux version 6.1.0-test ...") is put in a non-loaded spot of the file, as the
    stripped vmlinux carries linux_banner in .rodata.
    """
    notes = b""
    if pvh_entry is not None:
        notes = struct.pack("<III", 4, 8, XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + struct.pack(
            "<Q", pvh_entry)
    nph = len(segments) + (1 if notes else 0)
    offset = 64 + 56 * nph
    phdrs, blobs = [], []
    for paddr, data, memsz in segments:
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 7, offset, paddr + KERNEL_MAP, paddr, len(data),
                                 memsz, 0x200000))
        blobs.append(data)
        offset += len(data)
    if notes:
        phdrs.append(struct.pack("<IIQQQQQQ", 4, 4, offset, 0, 0, len(notes), len(notes), 4))
        blobs.append(notes)
        offset += len(notes)
    if banner:
        blobs.append(banner + b"\0")
    ident = b"\x7fELF" + bytes([elfclass, 1, 1, 0]) + bytes(8)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, 64, 0, 0, 64, 56, nph,
                               64, 0, 0)
    return ehdr + b"".join(phdrs) + b"".join(blobs)


def compress(data: bytes, kind: str) -> bytes:
    """Compress like the kernel build: the stream, then (size_append) the uncompressed size, le32."""
    if kind == "gzip":
        stream = gzip.compress(data, 9, mtime=0)
    elif kind == "bzip2":
        stream = bz2.compress(data, 9)
    elif kind == "xz":      # xz --check=crc32 --x86 --lzma2
        stream = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                               filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}])
    elif kind == "lzma":
        stream = lzma.compress(data, format=lzma.FORMAT_ALONE)
    elif kind == "lz4":     # lz4 -l: legacy frame, 8 MiB blocks
        import lz4.block
        stream = struct.pack("<I", LZ4_LEGACY_MAGIC)
        for i in range(0, len(data), LZ4_LEGACY_BLOCK):
            block = lz4.block.compress(data[i:i + LZ4_LEGACY_BLOCK], store_size=False)
            stream += struct.pack("<I", len(block)) + block
    elif kind == "zstd":
        import zstandard
        stream = zstandard.ZstdCompressor(level=19).compress(data)
    elif kind == "none":
        return data
    else:
        raise ValueError(f"unknown compression {kind!r}")
    return stream + struct.pack("<I", len(data))


def make_bzimage(payload: bytes, *, version: int = 0x020f, setup_sects: int = 4,
                 xloadflags: int = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
                 init_size: int = 0x2000000, pref_address: int = 0x1000000,
                 relocatable: int = 1, kernel_alignment: int = 0x200000, cmdline_size: int = 2047,
                 initrd_addr_max: int = 0x7fffffff,
                 version_string: str = "6.1.0-synthetic (pykvm@tests) #1 SMP",
                 decompressor: bytes = b"\x90" * 0x200, tail: bytes = b"\xcc" * 0x40) -> bytes:
    """A bzImage: boot sector + setup (`setup_sects` sectors) + protected-mode part, which is
    `decompressor` bytes, the payload, then `tail`."""
    setup = bytearray((setup_sects + 1) * 512)
    ver_at = 0x300
    setup[ver_at:ver_at + len(version_string) + 1] = version_string.encode() + b"\0"
    fields = {sc.name: 0 for sc in SETUP_HEADER.subcons}
    fields.update(
        setup_sects=setup_sects, boot_flag=0xAA55, header=b"HdrS", version=version,
        jump=0xEB | ((0x26c - 0x202) << 8),   # jmp short over the header to 0x26c
        kernel_version=ver_at - 0x200, loadflags=0x01, code32_start=0x100000,
        heap_end_ptr=0, initrd_addr_max=initrd_addr_max, kernel_alignment=kernel_alignment,
        relocatable_kernel=relocatable, min_alignment=21, xloadflags=xloadflags,
        cmdline_size=cmdline_size, payload_offset=len(decompressor), payload_length=len(payload),
        pref_address=pref_address, init_size=init_size,
        syssize=(len(decompressor) + len(payload) + len(tail) + 15) // 16)
    header = SETUP_HEADER.build(fields)
    setup[HEADER_OFFSET:HEADER_OFFSET + len(header)] = header
    return bytes(setup) + decompressor + payload + tail
