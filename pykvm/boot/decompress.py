"""Decompress a bzImage payload on the host, giving the ELF vmlinux the kernel's own decompressor makes.

Why on the host: the bzImage decompressor runs at CPL0, which KVM-PVM hosts emulate instruction by
instruction (see docs/kvm-pvm.md: 82 s to decompress Debian's LZ4 kernel in the guest, against
well under a second here).

What the payload is (arch/x86/boot/compressed/Makefile): `vmlinux.bin` (vmlinux with symbols stripped,
still an ELF file), followed by `vmlinux.relocs` when the kernel is relocatable, compressed with the
CONFIG_KERNEL_* compressor. Every compressor but gzip gets `size_append`: four little-endian bytes
after the stream giving the uncompressed size, which the kernel's pre-boot decompressors read (e.g.
lib/decompress_unlz4.c under PREBOOT reads it at input + in_len - 4). So every decoder here stops at the
end of its stream and ignores what follows. The relocations that trail the ELF do no harm: pykvm loads
the kernel at its link address, where no relocation is needed, and the ELF loader reads by offset.

Every decoder stops at `limit` bytes of output (MAX_VMLINUX unless told otherwise): a few KiB of
hostile input can describe GiBs (a zstd RLE block or a gzip stream of zeros), and the ELF is held
in host memory whole. A stripped x86-64 vmlinux is tens of MiB (Debian's: ~60).
"""

from __future__ import annotations

import bz2
import lzma
import zlib

import lz4.block
import zstandard

from pykvm.boot.errors import BootError

# Magic numbers, as the kernel's own lib/decompress.c table recognizes them.
_MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),           # .lzma "alone" header: properties byte 0x5d, dictionary size
    (b"\x89LZO", "lzo"),
    (b"\x02\x21\x4c\x18", "lz4"),        # LZ4 legacy frame magic 0x184C2102, little-endian
    (b"\x28\xb5\x2f\xfd", "zstd"),       # zstd frame magic 0xFD2FB528, little-endian
    (b"\x7fELF", "none"),                # CONFIG_KERNEL_UNCOMPRESSED
)

LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20     # the legacy format's fixed uncompressed block size (lz4 -l)
MAX_VMLINUX = 512 << 20        # the most a payload may decompress to
_OUT_CHUNK = 16 << 20         # zlib/bz2/lzma output produced at a time
_ZSTD_SLICE = 1024             # zstd input fed at a time: <= 32 MiB of output per slice


def detect_compression(payload: bytes) -> str:
    """Name the payload's compression from its magic: gzip, bzip2, xz, lzma, lzo, lz4, zstd or none."""
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name
    raise BootError(f"payload starts with {bytes(payload[:6]).hex()}, no known compression magic "
                    f"(gzip/bzip2/xz/lzma/lz4/zstd): the image is corrupt or uses a new format")


class TooLarge(BootError):
    pass


def _too_large(name: str, limit: int) -> BootError:
    return TooLarge(f"{name} payload decompresses to more than {limit >> 20} MiB, more than any "
                    f"vmlinux: the image is corrupt or hostile")


def decompress_payload(payload: bytes, limit: int = MAX_VMLINUX) -> tuple[str, bytes]:
    """Decompress a bzImage payload; return (compression name, vmlinux bytes). Output beyond
    `limit` bytes is refused (BootError) without being produced."""
    kind = detect_compression(payload)
    if kind == "none":
        if len(payload) > limit:
            raise _too_large(kind, limit)
        return kind, bytes(payload)
    if kind == "lzo":
        raise BootError("payload is LZO-compressed, which pykvm cannot decompress on the host: "
                        "load with decompress=False or use a gzip/xz/lz4/zstd kernel")
    try:
        out = _DECODERS[kind](payload, limit)
    except BootError:
        raise
    except Exception as e:  # each library raises its own error type for corrupt input
        raise BootError(f"{kind} payload is corrupt ({type(e).__name__}: {e}): re-fetch the kernel")
    if not out:
        raise BootError(f"{kind} payload decompressed to nothing: re-fetch the kernel")
    return kind, out


def _stream(name: str, make):
    """A decoder for a format with an end-of-stream marker: decode up to it, ignore what follows.
    zlib, bz2 and lzma decompressors take max_length: output comes _OUT_CHUNK at a time and is
    counted, so a bomb costs at most `limit` plus one chunk of host memory."""
    def decode(data: bytes, limit: int) -> bytes:
        d = make()
        out, total, pending, idle = [], 0, data, 0
        while not d.eof:
            chunk = d.decompress(pending, max_length=_OUT_CHUNK)
            # zlib hands back the input it did not get to; bz2/lzma keep it inside.
            pending = getattr(d, "unconsumed_tail", b"")
            total += len(chunk)
            if total > limit:
                raise _too_large(name, limit)
            out.append(chunk)
            starved = not pending if hasattr(d, "unconsumed_tail") else d.needs_input
            idle = idle + 1 if not chunk else 0
            if (starved and not chunk) or idle > 2:
                break
        if not d.eof:
            raise BootError(f"{name} payload ends before its stream does: the image is truncated")
        return b"".join(out)
    return decode


def _zstd(data: bytes, limit: int) -> bytes:
    """zstd's decompressobj has no max_length: feed it small slices and count. `zstd -22 --ultra`
    (the kernel's choice) uses windows up to 128 MiB and may omit the content size."""
    d = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
    out, total = [], 0
    for pos in range(0, len(data), _ZSTD_SLICE):
        chunk = d.decompress(data[pos:pos + _ZSTD_SLICE])
        total += len(chunk)
        if total > limit:
            raise _too_large("zstd", limit)
        out.append(chunk)
        if d.eof:
            break
    if not d.eof:
        raise BootError("zstd payload ends before its stream does: the image is truncated")
    return b"".join(out)


def _lz4_legacy(data: bytes, limit: int) -> bytes:
    """The LZ4 legacy frame the kernel uses (lz4 -l): magic, then blocks of [le32 size][size bytes].

    Each block decompresses to at most 8 MiB. The stream has no end marker: it ends with the input,
    which for a bzImage is followed by the 4-byte size_append trailer. A block size equal to the magic
    starts a further concatenated frame.
    """
    out, total = [], 0
    pos, end = 4, len(data)
    while pos < end:
        if end - pos == 4 and out:
            break                               # the size_append trailer
        if end - pos < 4:
            raise BootError("lz4 payload ends inside a block header: the image is truncated")
        size = int.from_bytes(data[pos:pos + 4], "little")
        pos += 4
        if size == LZ4_LEGACY_MAGIC:
            continue
        if size > end - pos:
            raise BootError(f"lz4 block of {size} bytes at payload offset {pos - 4:#x} runs past the "
                            f"payload's end: the image is truncated")
        block = lz4.block.decompress(data[pos:pos + size], uncompressed_size=LZ4_LEGACY_BLOCK)
        total += len(block)
        if total > limit:
            raise _too_large("lz4", limit)
        out.append(block)
        pos += size
    if not out:
        raise BootError("lz4 payload has no blocks: the image is truncated")
    return b"".join(out)


_DECODERS = {
    # gzip container (wbits 16+); unused_data keeps any tail
    "gzip": _stream("gzip", lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)),
    "bzip2": _stream("bzip2", bz2.BZ2Decompressor),
    # The kernel's xz stream uses the x86 BCJ filter and a CRC32 check; liblzma reads both from the
    # stream header. FORMAT_ALONE (.lzma) has an end marker or a stored size.
    "xz": _stream("xz", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)),
    "lzma": _stream("lzma", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)),
    "zstd": _zstd,
    "lz4": _lz4_legacy,
}
