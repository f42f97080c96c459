"""Disks on the host: what a virtual disk (virtio-blk, IDE) reads and writes.

Every disk is a `BlockBackend` (the interface, below, with defaults for its optional parts):
`DiskImage(path, readonly=False, snapshot=False)`, a raw image file, and `MemoryDisk(size)`, a
bytearray for tests. Sizes and offsets are bytes; devices address whole `SECTOR`s.

    read(offset, n) -> bytes     exactly n bytes; a range past the end raises DiskError
    write(offset, data)          DiskReadOnlyError if readonly
    flush()                      fsync: the data is on stable storage when it returns
    discard(offset, n)           the guest no longer needs these bytes (a hint; may do nothing)
    size                         bytes

With `snapshot=True` the file is opened read-only and every write goes to an overlay of 4 KiB
chunks instead, so the image stays byte-identical however the guest scribbles on it (QEMU's
`-snapshot`). The overlay is a temporary sparse file (pykvm/host/overlay.py), not host RAM: a
guest writing its whole disk does not grow the VMM. `DiskImage.overlay` is that Overlay (None
without snapshot): its `chunks()` and `load()` save and restore what the guest wrote.
"""

from __future__ import annotations

import os
import threading
from pykvm.x86.layout import SECTOR  # noqa: F401  (the disks' unit, re-exported for devices)

from .overlay import Overlay, pread_exact


class DiskError(OSError):
    """A disk request the image cannot serve (out of range, read-only, I/O error)."""


class DiskReadOnlyError(DiskError):
    pass


class BlockBackend:
    """What a virtual disk (VirtioBlk, AtaDrive) needs from its storage. A subclass sets `size`
    (bytes) and implements `read` and `write`; the rest are optional, with defaults here:
    `readinto`/`writefrom` (scatter-gather straight into or out of guest RAM; by default one read
    or write and a copy), `flush` (nothing to flush), `discard` (keep the bytes: always allowed),
    `close`. `readonly` refuses writes; `path` names the disk (virtio-blk's default serial)."""

    size: int = 0
    readonly: bool = False
    path: str = ""

    def read(self, offset: int, n: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def write(self, offset: int, data: bytes) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def readinto(self, offset: int, buffers: list[memoryview]) -> None:
        """Fill `buffers` in order with the disk's bytes from `offset`."""
        data, pos = memoryview(self.read(offset, sum(map(len, buffers)))), 0
        for b in buffers:
            b[:] = data[pos:pos + len(b)]
            pos += len(b)

    def writefrom(self, offset: int, buffers: list[memoryview]) -> None:
        """Write `buffers` in order at `offset`."""
        self.write(offset, b"".join(buffers))

    def flush(self) -> None:
        pass

    def discard(self, offset: int, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryDisk(BlockBackend):
    """A disk in a bytearray, for tests. `flushes` counts flush() calls."""

    def __init__(self, size: int, readonly: bool = False, data: bytes | None = None):
        self.buf = bytearray(data if data is not None else size)
        self.size = len(self.buf)
        self.readonly = readonly
        self.flushes = 0

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or offset + n > self.size:
            raise DiskError(f"{n} bytes at {offset} outside a {self.size}-byte disk")
        return bytes(self.buf[offset:offset + n])

    def write(self, offset: int, data: bytes) -> None:
        if self.readonly:
            raise DiskReadOnlyError("read-only disk")
        if offset < 0 or offset + len(data) > self.size:
            raise DiskError(f"{len(data)} bytes at {offset} outside a {self.size}-byte disk")
        self.buf[offset:offset + len(data)] = data

    def flush(self) -> None:
        self.flushes += 1


def _skip(buffers: list[memoryview], n: int) -> list[memoryview]:
    """The buffers with their first `n` bytes dropped (to resume a short preadv/pwritev)."""
    out = []
    for b in buffers:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out


class DiskImage(BlockBackend):
    def __init__(self, path: str | os.PathLike, readonly: bool = False, snapshot: bool = False):
        self.path = os.fspath(path)
        self.readonly = readonly
        self.snapshot = snapshot
        flags = os.O_RDONLY if (readonly or snapshot) else os.O_RDWR
        self.fd = os.open(self.path, flags | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        if self.size == 0:
            # A block device reports 0 in st_size: ask it.
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self._lock = threading.Lock()
        self.overlay: Overlay | None = None
        if snapshot:
            try:
                self.overlay = Overlay(self.size, self._pread)
            except BaseException:
                os.close(self.fd)
                raise

    def _check(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise DiskError(f"{self.path}: {n} bytes at {offset} outside a {self.size}-byte image")

    def _pread(self, offset: int, n: int) -> bytes:
        return pread_exact(self.fd, n, offset,
                           lambda at: DiskError(f"{self.path}: short read at {at}"))

    def read(self, offset: int, n: int) -> bytes:
        self._check(offset, n)
        if self.overlay is None or not self.overlay.written:
            return self._pread(offset, n)
        with self._lock:
            return self.overlay.read(offset, n)

    def readinto(self, offset: int, buffers: list[memoryview]) -> None:
        """Fill `buffers` (e.g. guest RAM windows) with the image's bytes from `offset`, in order.

        For a plain image this is preadv(2) straight into the buffers: no copy in Python, which is
        what lets a guest read at close to the host's own speed."""
        n = sum(map(len, buffers))
        self._check(offset, n)
        if self.overlay is not None and self.overlay.written:
            super().readinto(offset, buffers)      # through read(), which merges the overlay
            return
        done = 0
        while done < n:
            got = os.preadv(self.fd, _skip(buffers, done) if done else buffers, offset + done)
            if got <= 0:
                raise DiskError(f"{self.path}: short read at {offset + done}")
            done += got

    def writefrom(self, offset: int, buffers: list[memoryview]) -> None:
        """Write `buffers` (in order) at `offset`: pwritev(2) for a plain image."""
        if self.readonly or self.snapshot:
            super().writefrom(offset, buffers)     # through write(): refusal, or the overlay
            return
        n = sum(len(b) for b in buffers)
        self._check(offset, n)
        done = 0
        while done < n:
            done += os.pwritev(self.fd, _skip(buffers, done), offset + done)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.readonly:
            raise DiskReadOnlyError(f"{self.path} is read-only")
        data = memoryview(data).cast("B")
        self._check(offset, len(data))
        if not self.snapshot:
            done = 0
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], offset + done)
            return
        with self._lock:
            self.overlay.write(offset, data)

    def flush(self) -> None:
        if not (self.readonly or self.snapshot):
            os.fsync(self.fd)

    def discard(self, offset: int, n: int) -> None:
        """A hint that the range's contents no longer matter. We keep them (always allowed)."""
        self._check(offset, n)
        if self.readonly:
            raise DiskReadOnlyError(f"{self.path} is read-only")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.overlay is not None:
            self.overlay.close()

    def __enter__(self) -> "DiskImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
