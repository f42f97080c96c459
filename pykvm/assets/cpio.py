"""cpio "newc" archives: the format of Linux initramfs images.

Each member is a 110-byte ASCII header, the NUL-terminated name, zero padding
to a multiple of 4 bytes, the file data, and zero padding to 4 again. The
header (``Documentation/driver-api/early-userspace/buffer-format.rst`` in the
kernel tree)::

    offset  field        (8 ASCII hex digits each, after the 6-byte magic)
       0    c_magic      "070701" (newc; "070702" would carry a checksum)
       6    c_ino        inode number; only matters for hard links (nlink > 1)
      14    c_mode       S_IFREG/S_IFDIR/S_IFLNK/S_IFCHR... | permission bits
      22    c_uid
      30    c_gid
      38    c_nlink
      46    c_mtime
      54    c_filesize   bytes of data; for a symlink, its target
      62    c_maj        device the file lived on (ignored here)
      70    c_min
      78    c_rmaj       for device nodes: the node's major number
      86    c_rmin       ... and minor number
      94    c_namesize   including the terminating NUL
     102    c_chksum     0 for "070701"

The archive ends with a member named ``TRAILER!!!``. Because device nodes
are just headers, an unprivileged user can put ``/dev/console`` into an
initramfs; the kernel creates the node while unpacking.

The header is described with ``construct`` so that the layout above is the
code. Archives written here are reproducible: mtime 0, inode numbers in
member order.
"""

from __future__ import annotations

import io
import stat
from collections.abc import Iterable
from dataclasses import dataclass

import construct as cs

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110


class _Hex8(cs.Adapter):
    """An unsigned integer stored as 8 ASCII hex digits."""

    def _decode(self, obj: bytes, context, path) -> int:
        try:
            return int(obj, 16)
        except ValueError:
            raise cs.ValidationError(f"not hex: {obj!r}", path=path) from None

    def _encode(self, obj: int, context, path) -> bytes:
        if not 0 <= obj <= 0xFFFFFFFF:
            raise cs.ValidationError(f"{obj} does not fit 8 hex digits", path=path)
        return b"%08X" % obj


_hex8 = _Hex8(cs.Bytes(8))

Header = cs.Struct(
    "magic" / cs.Const(MAGIC),
    "ino" / _hex8,
    "mode" / _hex8,
    "uid" / _hex8,
    "gid" / _hex8,
    "nlink" / _hex8,
    "mtime" / _hex8,
    "filesize" / _hex8,
    "devmajor" / _hex8,
    "devminor" / _hex8,
    "rdevmajor" / _hex8,
    "rdevminor" / _hex8,
    "namesize" / _hex8,
    "check" / _hex8,
)
assert Header.sizeof() == HEADER_SIZE


def _pad4(n: int) -> int:
    return -n % 4


# One member. Every member starts 4-byte aligned, so padding computed from the
# member's own start is padding relative to the archive.
Member = cs.Struct(
    "header" / Header,
    "name" / cs.Bytes(cs.this.header.namesize),
    cs.Padding(lambda ctx: _pad4(HEADER_SIZE + ctx.header.namesize)),
    "data" / cs.Bytes(cs.this.header.filesize),
    cs.Padding(lambda ctx: _pad4(ctx.header.filesize)),
)


class CpioError(ValueError):
    """A malformed archive or an entry that cannot be archived."""


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``name`` is relative (``"bin/sh"``, not ``"/bin/sh"``)."""

    name: str
    mode: int  # file type | permissions, as in st_mode
    data: bytes = b""  # file contents, or a symlink's target
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> CpioEntry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(name, stat.S_IFCHR | perm, rdev=(major, minor))

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_char_device(self) -> bool:
        return stat.S_ISCHR(self.mode)


def _check(entry: CpioEntry) -> bytes:
    name = entry.name.encode()
    if not name or b"\0" in name or name.startswith(b"/"):
        raise CpioError(f"bad member name {entry.name!r}: must be relative, non-empty, without NUL")
    if entry.name == TRAILER:
        raise CpioError(f"{TRAILER!r} is reserved for the end of the archive")
    if entry.data and not (entry.is_file or entry.is_symlink):
        raise CpioError(f"{entry.name}: only regular files and symlinks carry data")
    return name


def _member(ino: int, name: bytes, mode: int, data: bytes, *, uid=0, gid=0, mtime=0,
            nlink=1, rdev=(0, 0)) -> bytes:
    return Member.build(dict(
        header=dict(ino=ino, mode=mode, uid=uid, gid=gid, nlink=nlink, mtime=mtime,
                    filesize=len(data), devmajor=0, devminor=0,
                    rdevmajor=rdev[0], rdevminor=rdev[1], namesize=len(name) + 1, check=0),
        name=name + b"\0",
        data=data,
    ))


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """The newc archive of ``entries``, in order, followed by the trailer."""
    out = bytearray()
    ino = 0
    for ino, entry in enumerate(entries, start=1):
        name = _check(entry)
        try:
            out += _member(ino, name, entry.mode, entry.data, uid=entry.uid, gid=entry.gid,
                           mtime=entry.mtime, nlink=2 if entry.is_dir else 1, rdev=entry.rdev)
        except cs.ConstructError as e:
            raise CpioError(f"{entry.name}: {e}") from None
    out += _member(ino + 1, TRAILER.encode(), 0, b"")
    return bytes(out)


def read_cpio(archive: bytes) -> list[CpioEntry]:
    """The members of a newc archive, up to its trailer (for tests and inspection).

    Checks the magic, the NUL after each name, zero padding, and that the
    trailer is there; raises :class:`CpioError` otherwise.
    """
    entries: list[CpioEntry] = []
    stream = io.BytesIO(archive)
    offset = 0
    while True:
        if offset + HEADER_SIZE > len(archive):
            raise CpioError(f"truncated archive: no {TRAILER} member (offset {offset})")
        stream.seek(offset)
        try:
            member = Member.parse_stream(stream)
        except cs.ConstructError as e:
            raise CpioError(f"bad member at offset {offset}: {e}") from None
        h = member.header
        raw_name = member.name
        if not raw_name.endswith(b"\0"):
            raise CpioError(f"member name at offset {offset} is not NUL-terminated")
        name_end = offset + HEADER_SIZE + h.namesize
        data_start = name_end + _pad4(HEADER_SIZE + h.namesize)
        data_end = data_start + h.filesize
        next_offset = data_end + _pad4(h.filesize)
        if next_offset > len(archive):
            raise CpioError(f"truncated member at offset {offset}")
        if any(archive[name_end:data_start]) or any(archive[data_end:next_offset]):
            raise CpioError(f"non-zero padding in member at offset {offset}")
        name = raw_name[:-1].decode()
        if name == TRAILER:
            return entries
        entries.append(CpioEntry(name, h.mode, member.data, uid=h.uid, gid=h.gid, mtime=h.mtime,
                                 rdev=(h.rdevmajor, h.rdevminor)))
        offset = next_offset
