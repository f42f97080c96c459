"""The snapshot file: a header, a table of sections, the sections, and guest RAM.

    offset  size  field (little-endian)
    0       8     magic "PYKVMSNP"
    8       4     format version (FORMAT_VERSION; a reader refuses any other)
    12      4     number of sections, n
    16      24*n  section table: 4-byte name, u64 offset, u64 length, u32 CRC-32 of the bytes
    16+24n  4     CRC-32 of everything above (so a flipped bit in the table is caught too)
    ...           the sections, each at the offset its entry gives

Sections ("META", "VCPU", "VMST", "DEVS", "DISK") hold values in pykvm/snapshot/codec.py's
encoding. "RAM " holds guest RAM: each region's bytes at a page-aligned offset in the file (in the
order META lists the regions, each at the next page boundary), so a restore maps them straight from the file with
mmap(MAP_PRIVATE): no copy, pages read on first touch, and clones of one snapshot share every page
none of them has written (copy-on-write). Pages of RAM that are all zero are left as holes: the
file is sparse, and a hole reads as zeros through the mapping.

RAM's CRC is computed when saving but only checked on request (`verify=True`, `pykvm restore
--verify`): checking means reading every page, which is most of what a restore avoids. The other
sections are always checked.

The header is three fixed little-endian records, so the standard library's `struct` describes it
(its format strings below are the table above); construct, which pykvm uses for the boot and ACPI
structures, would add ~25 ms of imports to every restore for these 28 bytes of layout.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections import namedtuple

MAGIC = b"PYKVMSNP"
# 1: session 3's format. 2: the ACPI PM device's state carries the GPE0 block, and a VM generation
# ID device's 16 bytes are saved (issue 13); a version-1 file would not restore into today's devices.
FORMAT_VERSION = 2
PAGE = mmap.PAGESIZE
_ZERO_CHUNK = 1 << 20     # zero pages are found (and skipped) a MiB at a time

_FIXED = struct.Struct("<8sII")       # magic, version, number of sections
_ENTRY = struct.Struct("<4sQQI")      # name, offset, length, CRC-32
_CRC = struct.Struct("<I")            # CRC-32 of the header before it


SectionEntry = namedtuple("SectionEntry", "name offset length crc")   # one _ENTRY, unpacked


class SnapshotFormatError(Exception):
    """The file is not a snapshot this pykvm can read (one line, for the CLI)."""


def _align(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def write(path: str | os.PathLike, sections: dict[str, bytes], ram: list[memoryview]) -> dict:
    """Write `sections` (name -> bytes) and the RAM regions to `path`, atomically (a temporary
    file renamed over it). Returns {"ram_offsets": [...], "size": bytes written}."""
    names = list(sections) + ["RAM "]
    header_len = _FIXED.size + _ENTRY.size * len(names) + _CRC.size
    entries, pos = [], header_len
    for name in sections:
        entries.append(SectionEntry(name.encode(), pos, len(sections[name]),
                                    zlib.crc32(sections[name])))
        pos += len(sections[name])
    ram_start = _align(pos)
    ram_offsets, off = [], ram_start
    for view in ram:
        ram_offsets.append(off)
        off = _align(off + len(view))
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        ram_crc = 0
        for view, at in zip(ram, ram_offsets):
            ram_crc = _write_sparse(fd, view, at, ram_crc)
        entries.append(SectionEntry(b"RAM ", ram_start, off - ram_start, ram_crc))
        os.ftruncate(fd, off)
        head = _FIXED.pack(MAGIC, FORMAT_VERSION, len(entries)) + b"".join(
            _ENTRY.pack(*e) for e in entries)
        head += _CRC.pack(zlib.crc32(head))
        assert len(head) == header_len
        os.pwrite(fd, head + b"".join(sections.values()), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    return {"ram_offsets": ram_offsets, "size": off}


def _write_sparse(fd: int, view: memoryview, at: int, crc: int) -> int:
    zero = bytes(_ZERO_CHUNK)
    for start in range(0, len(view), _ZERO_CHUNK):
        chunk = view[start:start + _ZERO_CHUNK]
        crc = zlib.crc32(chunk, crc)
        if chunk != zero[:len(chunk)]:
            done = 0
            while done < len(chunk):
                done += os.pwrite(fd, chunk[done:], at + start + done)
    return crc


class SnapshotFile:
    """An open snapshot: `sections` (name -> bytes, CRC-checked), `fd` and `ram_entry` for mapping
    RAM. Raises SnapshotFormatError for a file that is not one, truncated or corrupted."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SnapshotFormatError(f"snapshot {self.path} does not exist") from None
        except IsADirectoryError:
            raise SnapshotFormatError(f"snapshot {self.path} is a directory") from None
        except PermissionError:
            raise SnapshotFormatError(f"snapshot {self.path} is not readable by this user") from None
        try:
            self._read()
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        size = os.fstat(self.fd).st_size
        fixed = os.pread(self.fd, _FIXED.size, 0)
        if len(fixed) < _FIXED.size or fixed[:8] != MAGIC:
            raise SnapshotFormatError(f"{self.path} is not a pykvm snapshot (no PYKVMSNP header)")
        _, version, count = _FIXED.unpack(fixed)
        if version != FORMAT_VERSION:
            raise SnapshotFormatError(f"{self.path} is a version {version} snapshot; this pykvm "
                                      f"reads version {FORMAT_VERSION} only")
        if not 1 <= count <= 64:
            raise SnapshotFormatError(f"{self.path}: corrupted header ({count} sections)")
        head_len = _FIXED.size + _ENTRY.size * count
        head = os.pread(self.fd, head_len + 4, 0)
        if len(head) < head_len + 4:
            raise SnapshotFormatError(f"{self.path} is truncated (in its header)")
        if zlib.crc32(head[:head_len]) != _CRC.unpack_from(head, head_len)[0]:
            raise SnapshotFormatError(f"{self.path}: corrupted header (checksum mismatch)")
        entries = [SectionEntry(*_ENTRY.unpack_from(head, _FIXED.size + _ENTRY.size * i))
                   for i in range(count)]
        self.entries = {e.name.decode("latin-1"): e for e in entries}
        self.sections: dict[str, bytes] = {}
        for name, e in self.entries.items():
            if e.offset + e.length > size:
                raise SnapshotFormatError(f"{self.path} is truncated (section {name.strip()!r} "
                                          f"ends at {e.offset + e.length}, the file at {size})")
            if name == "RAM ":
                continue
            data = os.pread(self.fd, e.length, e.offset)
            if zlib.crc32(data) != e.crc:
                raise SnapshotFormatError(f"{self.path}: section {name.strip()!r} is corrupted "
                                          "(checksum mismatch)")
            self.sections[name] = data
        if "RAM " not in self.entries:
            raise SnapshotFormatError(f"{self.path}: no RAM section")
        self.ram_entry = self.entries["RAM "]

    def ram_offsets(self, sizes: list[int]) -> list[int]:
        """The file offset of each RAM region, given their sizes in order (from META)."""
        off, out = self.ram_entry.offset, []
        for size in sizes:
            out.append(off)
            off = _align(off + size)
        if off > self.ram_entry.offset + self.ram_entry.length:
            raise SnapshotFormatError(f"{self.path}: the RAM section is shorter than its regions")
        return out

    def verify_ram(self, sizes: list[int]) -> None:
        """Read RAM back and check its CRC."""
        crc = 0
        for offset, length in zip(self.ram_offsets(sizes), sizes):
            pos = 0
            while pos < length:
                data = os.pread(self.fd, min(_ZERO_CHUNK, length - pos), offset + pos)
                if not data:
                    raise SnapshotFormatError(f"{self.path} is truncated (in RAM)")
                crc = zlib.crc32(data, crc)
                pos += len(data)
        if crc != self.ram_entry.crc:
            raise SnapshotFormatError(f"{self.path}: guest RAM is corrupted (checksum mismatch)")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
