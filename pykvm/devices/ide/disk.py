"""What an ATA drive stores its sectors in.

A backend is anything with `read(offset, n) -> bytes`, `write(offset, data)`, `flush()`, `size` and
`readonly`: pykvm.host.disk.DiskImage (a raw image file, optionally with a copy-on-write snapshot
overlay) for real use, `MemoryDisk` for tests. Errors are `DiskError` (pykvm.host.disk); the drive
turns them into ATA error bits (UNC on read, ABRT on write-protect) rather than stopping the VM: to the
guest a failing disk is a failing disk.
"""

from __future__ import annotations

from pykvm.host.disk import BlockBackend, DiskError, DiskImage, DiskReadOnlyError

SECTOR = 512


class MemoryDisk:
    """A disk in a bytearray. `flushes` counts flush() calls, for tests."""

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


def open_image(path: str, readonly: bool = False, snapshot: bool = False) -> DiskImage:
    return DiskImage(path, readonly=readonly, snapshot=snapshot)


__all__ = ["SECTOR", "BlockBackend", "DiskError", "DiskImage", "DiskReadOnlyError", "MemoryDisk",
           "open_image"]
