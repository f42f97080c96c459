"""The copy-on-write overlay behind `DiskImage(snapshot=True)` (`pykvm boot --snapshot`).

The guest's writes go to a temporary *sparse* file as large as the image, at the same offsets, and
a bitmap (one bit per 4 KiB chunk) says which chunks live there; everything else is read from the
untouched image. So the VMM's own memory does not grow with what the guest writes: the bitmap is
fixed by the image's size (32 KiB for a 1 GiB image), and the written data is in a file the kernel
pages as it likes (QEMU's `-snapshot` does the same with a temporary qcow2 file).

The file is created in $PYKVM_OVERLAY_DIR, else the system's temporary folder, and unlinked at
once: nothing is left behind however pykvm ends. What a VM snapshot needs to save and restore the
overlay (pykvm `snapshot` work):

    overlay.chunks()                 -> iterator of (offset, 4 KiB bytes) for every written chunk
    overlay.load(offset, data)       puts a saved chunk back (offset a multiple of CHUNK)
    overlay.fd                       the sparse file, to copy with os.copy_file_range if preferred
    overlay.written                  how many chunks the guest has written
"""

from __future__ import annotations

import os
import tempfile

CHUNK = 4096



def pread_exact(fd: int, n: int, offset: int, short) -> bytes:
    """Exactly `n` bytes at `offset` (pread may return fewer); `short(at)` makes the error for an
    end of file at `at` before that."""
    out = bytearray()
    while len(out) < n:
        got = os.pread(fd, n - len(out), offset + len(out))
        if not got:
            raise short(offset + len(out))
        out += got
    return bytes(out)

class Overlay:
    def __init__(self, size: int, base_read, directory: str | None = None):
        """`size`: the image's size. `base_read(offset, n)`: reads the image underneath."""
        self.size = size
        self._base_read = base_read
        folder = directory or os.environ.get("PYKVM_OVERLAY_DIR") or tempfile.gettempdir()
        try:
            fd, path = tempfile.mkstemp(prefix="pykvm-overlay-", dir=folder)
        except OSError as e:     # a folder that is missing, not a folder, read-only or full
            from ..cli_checks import InputError
            raise InputError(f"cannot create the --snapshot overlay in {folder}: {e.strerror}; "
                             "set PYKVM_OVERLAY_DIR to a writable folder") from None
        try:
            # Sparse: no blocks until written. Sized before the unlink: on a 9p mount (QEMU's
            # -virtfs, e.g. TMPDIR in the AMD-V lane) ftruncate of an unlinked file fails ENOENT,
            # while reads and writes through the open fd keep working.
            os.ftruncate(fd, size)
        finally:
            os.unlink(path)
        self.fd = fd
        self._bits = bytearray((size + CHUNK - 1) // CHUNK // 8 + 1)
        self.written = 0

    # ---- which chunks are ours ----
    def has(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def _mark(self, index: int) -> None:
        if not self.has(index):
            self._bits[index >> 3] |= 1 << (index & 7)
            self.written += 1

    # ---- I/O ----
    def _pread(self, offset: int, n: int) -> bytes:
        return pread_exact(self.fd, n, offset, lambda at: OSError(f"overlay: short read at {at}"))

    def _pwrite(self, offset: int, data) -> None:
        data = memoryview(data)
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def read(self, offset: int, n: int) -> bytes:
        """n bytes at offset: runs of overlay chunks from the file, the rest from the image."""
        out = bytearray()
        pos, end = offset, offset + n
        while pos < end:
            ours = self.has(pos // CHUNK)
            run_end = min((pos // CHUNK + 1) * CHUNK, end)
            while run_end < end and self.has(run_end // CHUNK) == ours:
                run_end = min(run_end + CHUNK, end)
            out += (self._pread if ours else self._base_read)(pos, run_end - pos)
            pos = run_end
        return bytes(out)

    def write(self, offset: int, data) -> None:
        """Write into the overlay. A chunk written for the first time but not whole is first
        filled from the image (copy on write), so its other bytes still read as before."""
        data = memoryview(data).cast("B")
        if not len(data):
            return
        end = offset + len(data)
        first, last = offset // CHUNK, (end - 1) // CHUNK
        for index in {first, last}:
            start = index * CHUNK
            whole = offset <= start and end >= min(start + CHUNK, self.size)
            if not self.has(index) and not whole:
                self._pwrite(start, self._base_read(start, min(CHUNK, self.size - start)))
        self._pwrite(offset, data)
        for index in range(first, last + 1):
            self._mark(index)

    # ---- for snapshots ----
    def chunks(self):
        """(offset, bytes) of every chunk the guest wrote, in order."""
        for byte_index, byte in enumerate(self._bits):
            if not byte:
                continue
            for bit in range(8):
                index = byte_index * 8 + bit
                if byte & (1 << bit) and index * CHUNK < self.size:
                    start = index * CHUNK
                    yield start, self._pread(start, min(CHUNK, self.size - start))

    def load(self, offset: int, data: bytes) -> None:
        """Put a saved chunk back (from chunks())."""
        if offset % CHUNK or offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"overlay chunk at {offset} ({len(data)} bytes) is not a chunk of a "
                             f"{self.size}-byte image")
        self.write(offset, data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
