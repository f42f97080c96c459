"""virtio-blk, the block device (VIRTIO 1.2 section 5.2).

One request queue. Each request is one descriptor chain (5.2.6):

    device-readable:  struct virtio_blk_req header { le32 type; le32 reserved; le64 sector; }
                      then, for OUT (write) and DISCARD, the data
    device-writable:  for IN (read) and GET_ID, the data buffer
                      then one status byte: 0 OK, 1 IOERR, 2 UNSUPP

Sectors are always 512 bytes, whatever `blk_size` says (that is only the guest's preferred I/O
granularity). The used length is what the device wrote: the data read plus the status byte.

Configuration space (5.2.4), little-endian:

    0  le64 capacity (512-byte sectors)   24 topology (8 bytes)    36 le32 max_discard_sectors
    8  le32 size_max                      32 u8 writeback          40 le32 max_discard_seg
    12 le32 seg_max                       33 u8 unused0            44 le32 discard_sector_alignment
    16 geometry (4 bytes)                 34 le16 num_queues       48..60 write zeroes (unused)
    20 le32 blk_size

Features offered: SEG_MAX (so Linux never builds a chain longer than the queue), BLK_SIZE, FLUSH
(the guest then treats the disk as a write-back cache and sends FLUSH, which we turn into fsync),
RO for a read-only image, DISCARD for a writable one (a hint we accept and, with a raw file, ignore).

The guest's mistakes become statuses, never exceptions: a request past the end of the disk, a data
length that is not whole sectors, a write to a read-only disk, a buffer outside RAM -> IOERR; an
unknown type -> UNSUPP; a chain with no writable byte for the status is dropped (length 0) and
counted. I/O is synchronous on the thread that delivered the notify: the ioeventfd worker
(pykvm/virtio/attach.py, LinuxVM's default), so the vCPU runs on meanwhile, or the vCPU itself when
kicks are MMIO exits. Shortcut, admitted: one thread serves the requests one after another, which
for a raw file in the page cache is fast enough; a pool would overlap long reads.

Reads and writes take a short way (`_plain_rw`): a chain that is exactly header, data buffers, one
status byte, and asks for an IN (or an OUT, on a writable disk) within the disk, is read straight
from the descriptor table with no more Python than it needs; anything else (and every error) goes
the long way (the queue's full walk and `_serve`), which does all the checking and counting.
Requests of adjacent sectors in the same direction made available in one kick are merged into one
preadv or pwritev (QEMU's virtio-blk does the same, `virtio_blk_submit_multireq`): one system
call per run of sequential requests, not per request (4 KiB writes: ~10x fewer host microseconds).
A driver sees no difference (unless its requests' buffers overlap each other's status bytes,
which is its own mistake: the statuses are written after all the data); a merged request that
fails is redone request by request, so each request still gets its own status. The C run loop
does the same in the same order (csrc/virtio_blk_fast.h).
"""

from __future__ import annotations

import logging
import struct

from pykvm.host.disk import SECTOR, BlockBackend
from pykvm.memory import GuestMemoryError

from .device import VIRTIO_ID_BLOCK, VirtioDevice
from .queue import (DESC, DESC_SIZE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, ChainError,
                    DescChain)

log = logging.getLogger("pykvm.virtio")


# Feature bits (5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_GEOMETRY = 1 << 4
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_TOPOLOGY = 1 << 10
VIRTIO_BLK_F_CONFIG_WCE = 1 << 11
VIRTIO_BLK_F_MQ = 1 << 12
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

# Request types (5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

# Status byte.
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
HEADER = struct.Struct("<IIQ")
_OK = bytes([0])     # VIRTIO_BLK_S_OK
# A plain request's data descriptors: all device-writable (a read) or all device-readable (a write).
_DATA_FLAGS = (VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT)
DISCARD_SEGMENT = struct.Struct("<QII")   # sector, num_sectors, flags

QUEUE_SIZE = 256
MAX_REQUEST_BYTES = 32 << 20     # far above what Linux sends (max_sectors_kb is 1280 by default)
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 16
# A merged read stops growing at either limit: preadv takes at most IOV_MAX (1024 on Linux)
# buffers, and one system call should not run for too long.
MERGE_MAX_BUFFERS = 1024
MERGE_MAX_BYTES = MAX_REQUEST_BYTES



class _Fail(Exception):
    """Ends a request with a status."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


DEFAULT_SERIAL = "pykvm-disk"


class VirtioBlk(VirtioDevice):
    """A virtio block device on `disk`. `serial` is what GET_ID returns (at most 20 bytes;
    Linux shows it in /sys/block/vda/serial and /dev/disk/by-id); DEFAULT_SERIAL unless given."""

    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"
    STATE = VirtioDevice.STATE + ("requests",)

    def __init__(self, disk: BlockBackend, *, serial: str | bytes | None = None,
                 readonly: bool | None = None, queue_size: int = QUEUE_SIZE,
                 blk_size: int = SECTOR):
        self.disk = disk
        self.readonly = disk.readonly if readonly is None else readonly
        features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        features |= VIRTIO_BLK_F_RO if self.readonly else VIRTIO_BLK_F_DISCARD
        super().__init__([queue_size], features)
        if serial is None:
            # Not the image's file name: the guest has no business learning host paths.
            serial = DEFAULT_SERIAL
        if isinstance(serial, str):
            serial = serial.encode()
        self.serial = serial[:VIRTIO_BLK_ID_BYTES]
        self.blk_size = blk_size
        self.capacity = disk.size // SECTOR
        self.requests = 0           # served by this Python model (fast_requests: by C)

    def config_bytes(self) -> bytes:
        return struct.pack(
            "<QII HBB I BBHI BBH III III B3x",
            self.capacity,
            0,                              # size_max (F_SIZE_MAX not offered)
            self.queues[0].max_size - 2,    # seg_max: room for the header and status descriptors
            0, 0, 0,                        # geometry (not offered)
            self.blk_size,
            0, 0, 0, 0,                     # topology (not offered)
            0, 0, 1,                        # writeback, unused0, num_queues
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 8,   # discard: granularity 8 sectors (4 KiB)
            0, 0, 0,                        # write zeroes (not offered)
            0)

    def write_config_bytes(self, offset: int, data: bytes) -> None:
        # `writeback` (offset 32) is writable only with F_CONFIG_WCE, which we do not offer.
        self.guest_error("config write", f"{len(data)} bytes at {offset:#x}")

    def process_queue(self, index: int) -> None:
        q = self.queues[0]
        start = q.next_used
        run: list[tuple[int, int, int]] = []      # adjacent plain requests, all reads or all
        run_write = False                         # writes: (head, status gpa, bytes written)
        buffers: list[memoryview] = []            # their data buffers, in order
        run_start = run_end = 0                   # the disk bytes they cover
        while (head := q.pop_head()) is not None:
            self.requests += 1
            plain = self._plain_rw(head)
            if plain is not None:
                write, offset, views, n, status = plain
                if run and (write != run_write or offset != run_end
                            or len(buffers) + len(views) > MERGE_MAX_BUFFERS
                            or run_end - run_start + n > MERGE_MAX_BYTES):
                    self._finish_run(run, run_start, buffers, run_write)
                    run, buffers = [], []
                if not run:
                    run_start = run_end = offset
                    run_write = write
                run.append((head, status, 0 if write else n))
                buffers += views
                run_end += n
                continue
            if run:
                self._finish_run(run, run_start, buffers, run_write)
                run, buffers = [], []
            chain = q.chain_at(head)
            if chain is not None:
                q.add_used(head, self._serve(chain))
        if run:
            self._finish_run(run, run_start, buffers, run_write)
        if q.next_used != start:
            self.signal_used(q)
        if self._fast is not None:
            self._fast.arm()        # the C run loop may serve the next kick (blk_fast.py)

    # ---- the C path (blk_fast.py), when a Machine's run loop serves kicks ----
    _fast = None

    def on_reset(self) -> None:
        if self._fast is not None:
            self._fast.disarm()

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()      # its polling thread, if it has one
        super().close()

    def after_restore(self) -> None:
        # A snapshot restore changed the queues behind C's copy of their addresses: C waits
        # until Python has served a kick again (blk_fast.py).
        self.on_reset()

    @property
    def fast_requests(self) -> int:
        """Requests the C run loop served (csrc/virtio_blk_fast.h)."""
        return self._fast.requests if self._fast is not None else 0

    # ---- the short way, for plain reads and writes ----
    def _plain_rw(self, head: int) -> tuple[bool, int, list[memoryview], int, int] | None:
        """(is a write, disk offset, data buffers, data bytes, status byte's gpa) if the chain at
        `head` is a plain read or write: a readable header (16 bytes for a write, at least 16 for
        a read), one or more data buffers all writable (a read) or all readable (a write), a
        writable status byte, all direct descriptors with no flag bits beyond NEXT and WRITE, an
        IN or (on a writable disk) OUT of whole sectors within the disk, every buffer in RAM.
        None for anything else, which then takes the long way (the full walk and `_serve`), where
        every mistake is counted: nothing is counted here. The descriptors are read here rather than by the walk because
        this is the one chain shape a block device sees all the time, and the walk's generality
        (indirect tables, any mix of buffers) costs Python on every request; each link is checked
        as the walk checks it (index inside the table, at most the table's size in all)."""
        q = self.queues[0]
        try:
            table, base = q.desc_table()
        except ChainError:
            return None
        size = q.size
        unpack = DESC.unpack_from
        haddr, hlen, flags, index = unpack(table, base + DESC_SIZE * head)
        if flags != VIRTQ_DESC_F_NEXT or hlen < HEADER.size:
            return None
        segs: list[tuple[int, int]] = []
        n = 0
        data_flags = None
        for _ in range(size - 1):
            if index >= size:
                return None
            addr, length, flags, index = unpack(table, base + DESC_SIZE * index)
            if flags == data_flags or (data_flags is None and flags in _DATA_FLAGS):
                data_flags = flags
                segs.append((addr, length))
                n += length
            elif flags == VIRTQ_DESC_F_WRITE and length == 1 and segs:
                status = addr
                break
            else:
                return None
        else:
            return None       # longer than its table: the walk will call it a loop
        if n % SECTOR or n > MAX_REQUEST_BYTES:
            return None
        mem = self.mem
        try:
            ram, off = mem.locate(haddr, HEADER.size)
            rtype, _, sector = HEADER.unpack_from(ram, off)
            write = data_flags == VIRTQ_DESC_F_NEXT
            if write:
                # The long way reads an OUT's data from the readable bytes after the header's
                # first 16: a longer header descriptor holds data, which only it handles.
                if rtype != VIRTIO_BLK_T_OUT or hlen != HEADER.size or self.readonly:
                    return None
            elif rtype != VIRTIO_BLK_T_IN:
                return None
            if sector + n // SECTOR > self.capacity:
                return None
            return write, sector * SECTOR, mem.views(segs), n, status
        except GuestMemoryError:
            return None

    def _finish_run(self, run: list[tuple[int, int, int]], offset: int,
                    buffers: list[memoryview], write: bool) -> None:
        """Read (or write) adjacent plain requests in one go, then give each its status and used
        entry."""
        q = self.queues[0]
        try:
            if write:
                self.disk.writefrom(offset, buffers)
            else:
                self.disk.readinto(offset, buffers)
        except OSError:
            # Redo them one by one: each request gets its own status (and the error its count).
            for head, _, _ in run:
                chain = q.chain_at(head)
                if chain is not None:
                    q.add_used(head, self._serve(chain))
            return
        mem = self.mem
        for head, status, n in run:
            try:
                mem.write(status, _OK)
            except GuestMemoryError as e:
                # No status byte we can write: the chain is dropped, as _serve would.
                q.guest_error("buffer outside RAM", str(e))
                n = -1
            q.add_used(head, n + 1)

    # ---- one request, the long way ----
    def _serve(self, chain: DescChain) -> int:
        if chain.writable_len == 0:
            self.guest_error("request without a status byte", f"head {chain.head}")
            return 0
        data_in = chain.writable_len - 1       # room for data before the status byte
        written = 0
        try:
            try:
                header = chain.read(0, HEADER.size)
            except ChainError:
                raise _Fail(VIRTIO_BLK_S_IOERR, "unreadable request header") from None
            rtype, _, sector = HEADER.unpack(header)
            written = self._request(chain, rtype, sector, data_in)
            status = VIRTIO_BLK_S_OK
        except _Fail as f:
            status = f.status
            self.guest_error("request failed" if status == VIRTIO_BLK_S_IOERR
                             else "unsupported request", str(f))
        except OSError as e:  # the host's disk failed: the guest sees an I/O error
            status = VIRTIO_BLK_S_IOERR
            self.errors["host I/O error"] += 1
            log.error("virtio-blk: %s", e)
        try:
            chain.write(data_in, bytes([status]))
        except ChainError:
            return 0
        return written + 1

    def _range(self, sector: int, nbytes: int) -> int:
        if nbytes % SECTOR:
            raise _Fail(VIRTIO_BLK_S_IOERR, f"{nbytes} bytes is not whole sectors")
        if nbytes > MAX_REQUEST_BYTES:
            raise _Fail(VIRTIO_BLK_S_IOERR, f"{nbytes}-byte request is too large")
        if sector + nbytes // SECTOR > self.capacity:
            raise _Fail(VIRTIO_BLK_S_IOERR,
                        f"sectors {sector}+{nbytes // SECTOR} past the end ({self.capacity})")
        return sector * SECTOR

    def _request(self, chain: DescChain, rtype: int, sector: int, data_in: int) -> int:
        """Do one request; returns the data bytes written into the chain."""
        if rtype == VIRTIO_BLK_T_IN:
            offset = self._range(sector, data_in)
            try:
                buffers = chain.views(True, 0, data_in)
            except ChainError:
                raise _Fail(VIRTIO_BLK_S_IOERR, "read buffer outside RAM") from None
            # Straight into guest RAM (preadv) where the backend can (pykvm.host.disk).
            self.disk.readinto(offset, buffers)
            return data_in
        if rtype == VIRTIO_BLK_T_OUT:
            n = chain.readable_len - HEADER.size
            offset = self._range(sector, n)
            if self.readonly:
                raise _Fail(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
            try:
                buffers = chain.views(False, HEADER.size, n)
            except ChainError:
                raise _Fail(VIRTIO_BLK_S_IOERR, "write buffer outside RAM") from None
            self.disk.writefrom(offset, buffers)
            return 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            self.disk.flush()
            return 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            n = min(data_in, VIRTIO_BLK_ID_BYTES)
            try:
                chain.write(0, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:n])
            except ChainError:
                raise _Fail(VIRTIO_BLK_S_IOERR, "id buffer outside RAM") from None
            return n
        if rtype == VIRTIO_BLK_T_DISCARD and not self.readonly:
            n = chain.readable_len - HEADER.size
            if n == 0 or n % DISCARD_SEGMENT.size or n // DISCARD_SEGMENT.size > MAX_DISCARD_SEG:
                raise _Fail(VIRTIO_BLK_S_IOERR, f"discard payload of {n} bytes")
            try:
                payload = chain.read(HEADER.size, n)
            except ChainError:
                raise _Fail(VIRTIO_BLK_S_IOERR, "discard segments outside RAM") from None
            ranges = []
            for start, count, flags in DISCARD_SEGMENT.iter_unpack(payload):
                if flags:
                    raise _Fail(VIRTIO_BLK_S_UNSUPP, f"discard flags {flags:#x}")
                if count > MAX_DISCARD_SECTORS or start + count > self.capacity:
                    raise _Fail(VIRTIO_BLK_S_IOERR, f"discard of sectors {start}+{count}")
                ranges.append((start * SECTOR, count * SECTOR))
            for offset, n in ranges:
                self.disk.discard(offset, n)
            return 0
        raise _Fail(VIRTIO_BLK_S_UNSUPP, f"request type {rtype}")
