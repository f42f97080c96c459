"""virtio-blk against a temporary raw image, driven by the mock driver through virtio-mmio."""

import hashlib
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pykvm.host.disk import BlockBackend, DiskError, DiskImage, DiskReadOnlyError
from pykvm.irq import RecordingIrqLine
from pykvm.memory import GuestMemory
from pykvm.virtio import blk as B
from pykvm.virtio.mmio import VirtioMmio
from pykvm.virtio.mock import MmioDriver

SECTORS = 64
RAM = 1 << 20


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(SECTORS * 512)))
    return p


def setup(disk, **kw):
    mem = GuestMemory.for_test(RAM)
    dev = B.VirtioBlk(disk, **kw)
    irq = RecordingIrqLine()
    t = VirtioMmio(dev, mem, irq)
    drv = MmioDriver(t, mem)
    feats = drv.init()
    return dev, drv, drv.queues[0], feats, irq


def hdr(rtype, sector=0):
    return struct.pack("<IIQ", rtype, 0, sector)


def submit(drv, q, readable, writable, **kw):
    head = q.add_chain(readable, writable, **kw)
    drv.kick(0)
    used = q.take_used()
    assert [h for h, _ in used] == [head]
    return head, used[0][1]


def test_config_and_features(image):
    with DiskImage(image) as disk:
        dev, drv, q, feats, irq = setup(disk)
        assert drv.config(0, 4) | drv.config(4, 4) << 32 == SECTORS
        assert drv.config(12, 4) == 254                 # seg_max
        assert drv.config(20, 4) == 512                 # blk_size
        assert feats & B.VIRTIO_BLK_F_FLUSH and feats & B.VIRTIO_BLK_F_SEG_MAX
        assert not feats & B.VIRTIO_BLK_F_RO
        assert len(dev.config_bytes()) == 64


def test_read_write_flush_round_trip(image):
    original = image.read_bytes()
    with DiskImage(image) as disk:
        dev, drv, q, feats, irq = setup(disk)
        # Read sectors 3-4 into two 512-byte buffers plus the status byte.
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_IN, 3)], [512, 512, 1])
        assert n == 1025
        assert q.written(head) == original[3 * 512:5 * 512] + b"\0"
        assert irq.level
        drv.ack_interrupt()
        # Write sector 10 through an indirect table, then flush, then read it back.
        payload = os.urandom(1024)
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_OUT, 10), payload], [1], indirect=True)
        assert n == 1 and q.written(head) == b"\0"
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_FLUSH)], [1])
        assert n == 1 and q.written(head) == b"\0"
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_IN, 10)], [1024, 1])
        assert q.written(head) == payload + b"\0"
    data = image.read_bytes()
    assert data[10 * 512:12 * 512] == payload
    assert data[:10 * 512] == original[:10 * 512] and data[12 * 512:] == original[12 * 512:]


def test_snapshot_leaves_file_byte_identical(image):
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    mtime = image.stat().st_mtime_ns
    with DiskImage(image, snapshot=True) as disk:
        dev, drv, q, feats, irq = setup(disk)
        payload = b"\x5a" * 1536
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_OUT, 7), payload], [1])
        assert q.written(head) == b"\0"
        # An unaligned read across overlay and base chunks sees the write.
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_IN, 6)], [2048, 1])
        got = q.written(head)
        assert got[512:2048] == payload and got[-1] == 0
        assert got[:512] == image.read_bytes()[6 * 512:7 * 512]
        submit(drv, q, [hdr(B.VIRTIO_BLK_T_FLUSH)], [1])
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest
    assert image.stat().st_mtime_ns == mtime


def test_readonly_refuses_writes_with_ioerr(image):
    original = image.read_bytes()
    with DiskImage(image, readonly=True) as disk:
        dev, drv, q, feats, irq = setup(disk)
        assert feats & B.VIRTIO_BLK_F_RO and not feats & B.VIRTIO_BLK_F_DISCARD
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_OUT, 0), b"x" * 512], [1])
        assert q.written(head) == bytes([B.VIRTIO_BLK_S_IOERR])
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_IN, 0)], [512, 1])
        assert q.written(head) == original[:512] + b"\0"
        with pytest.raises(DiskReadOnlyError):
            disk.write(0, b"x")
    assert image.read_bytes() == original


def test_get_id(image):
    with DiskImage(image) as disk:
        dev, drv, q, feats, irq = setup(disk, serial="pykvm-serial-0123456789")
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_GET_ID)], [20, 1])
        assert n == 21
        assert q.written(head) == b"pykvm-serial-0123456" + b"\0"
        dev, drv, q, feats, irq = setup(disk, serial="vda")
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_GET_ID)], [20, 1])
        assert q.written(head) == b"vda" + b"\0" * 17 + b"\0"


def test_guest_mistakes_become_status(image):
    with DiskImage(image) as disk:
        dev, drv, q, feats, irq = setup(disk)
        cases = [
            ([hdr(B.VIRTIO_BLK_T_IN, SECTORS - 1)], [1024, 1], B.VIRTIO_BLK_S_IOERR),  # past end
            ([hdr(B.VIRTIO_BLK_T_IN, 0)], [100, 1], B.VIRTIO_BLK_S_IOERR),   # not whole sectors
            ([hdr(B.VIRTIO_BLK_T_OUT, 2**63), b"y" * 512], [1], B.VIRTIO_BLK_S_IOERR),
            ([hdr(99)], [1], B.VIRTIO_BLK_S_UNSUPP),
            ([b"short"], [1], B.VIRTIO_BLK_S_IOERR),                          # header too short
        ]
        for readable, writable, status in cases:
            head, n = submit(drv, q, readable, writable)
            assert q.written(head)[-1] == status, (readable, writable)
        # A data buffer outside RAM: IOERR in the status, which is in RAM.
        status_addr = drv.alloc.alloc(1)
        hdr_addr = drv.alloc.alloc(16)
        drv.mem.write(hdr_addr, hdr(B.VIRTIO_BLK_T_IN, 0))
        head = q.add_segments([(hdr_addr, 16, False), (RAM - 256, 512, True),
                               (status_addr, 1, True)])
        drv.kick(0)
        assert q.take_used() == [(head, 1)]
        assert drv.mem.read(status_addr, 1) == bytes([B.VIRTIO_BLK_S_IOERR])
        assert dev.queue_errors >= 1
        # No writable byte at all: dropped with length 0.
        head = q.add_chain([hdr(B.VIRTIO_BLK_T_FLUSH)], [])
        drv.kick(0)
        assert q.take_used() == [(head, 0)]
        assert dev.errors["request without a status byte"] == 1


def test_discard_is_accepted(image):
    with DiskImage(image) as disk:
        dev, drv, q, feats, irq = setup(disk)
        assert feats & B.VIRTIO_BLK_F_DISCARD
        seg = struct.pack("<QII", 8, 8, 0)
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_DISCARD), seg], [1])
        assert q.written(head) == b"\0"
        seg = struct.pack("<QII", SECTORS, 8, 0)
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_DISCARD), seg], [1])
        assert q.written(head) == b"\x01"


def test_disk_image_api(tmp_path):
    p = tmp_path / "x.img"
    p.write_bytes(b"\1" * 10000)
    with DiskImage(p, snapshot=True) as d:
        assert d.size == 10000
        d.write(4090, b"\2" * 10)
        d.write(9999, b"\3")
        assert d.read(4088, 14) == b"\1\1" + b"\2" * 10 + b"\1\1"
        assert d.read(9998, 2) == b"\1\3"
        with pytest.raises(DiskError):
            d.read(9999, 2)
        with pytest.raises(DiskError):
            d.write(10000, b"\0")
    assert p.read_bytes() == b"\1" * 10000


class FakeDisk(BlockBackend):
    """A disk in a bytearray that records every access, for fuzzing."""

    def __init__(self, size):
        self.buf = bytearray(size)
        self.size = size
        self.readonly = False

    def read(self, off, n):
        assert 0 <= off and off + n <= self.size
        return bytes(self.buf[off:off + n])

    def write(self, off, data):
        assert 0 <= off and off + len(data) <= self.size
        self.buf[off:off + len(data)] = data

    def flush(self):
        pass


seg = st.tuples(st.one_of(st.integers(0, RAM), st.integers(0, 2**40)),
                st.one_of(st.sampled_from([0, 1, 16, 511, 512, 1024]), st.integers(0, 2**32 - 1)),
                st.booleans())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rtype=st.sampled_from([0, 1, 4, 8, 11, 13, 77]), sector=st.integers(0, 2**64 - 1),
       segs=st.lists(seg, max_size=5), header_in_ram=st.booleans())
def test_fuzz_requests(rtype, sector, segs, header_in_ram):
    disk = FakeDisk(SECTORS * 512)
    dev, drv, q, feats, irq = setup(disk)
    hdr_addr = drv.alloc.alloc(16) if header_in_ram else RAM + 4096
    if header_in_ram:
        drv.mem.write(hdr_addr, hdr(rtype, sector))
    head = q.add_segments([(hdr_addr, 16, False)] + sorted(segs, key=lambda s: s[2]))
    drv.kick(0)
    used = q.take_used()
    assert [h for h, _ in used] == [head]
    n = used[0][1]
    writable = [(a, ln) for a, ln, w in sorted(segs, key=lambda s: s[2]) if w]
    assert n <= sum(ln for _, ln in writable)
    if n:
        # The status byte is the last writable byte; it says OK only for a sane request.
        total = sum(ln for _, ln in writable)
        pos = total - 1
        for a, ln in writable:
            if pos < ln:
                status = drv.mem.read(a + pos, 1)[0]
                break
            pos -= ln
        assert status in (0, 1, 2)
        if not header_in_ram:
            assert status == B.VIRTIO_BLK_S_IOERR


def test_device_checks_ranges_itself():
    """The device must refuse out-of-range requests before the backend sees them."""
    disk = FakeDisk(SECTORS * 512)
    dev, drv, q, feats, irq = setup(disk)
    for sector, n in ((SECTORS - 1, 1024), (SECTORS, 512), (2**64 - 1, 512)):
        head, used = submit(drv, q, [hdr(B.VIRTIO_BLK_T_IN, sector)], [n, 1])
        assert q.written(head)[-1] == B.VIRTIO_BLK_S_IOERR
        head, used = submit(drv, q, [hdr(B.VIRTIO_BLK_T_OUT, sector), b"z" * n], [1])
        assert q.written(head) == bytes([B.VIRTIO_BLK_S_IOERR])
    head, used = submit(drv, q, [hdr(B.VIRTIO_BLK_T_IN, SECTORS - 2)], [1024, 1])
    assert q.written(head)[-1] == B.VIRTIO_BLK_S_OK


class CountingImage(DiskImage):
    """A DiskImage that records its readinto calls and can be told to fail the next few."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[tuple[int, int]] = []      # (offset, bytes)
        self.fail = 0

    def readinto(self, offset, buffers):
        self.calls.append((offset, sum(len(b) for b in buffers)))
        if self.fail:
            self.fail -= 1
            raise OSError(5, "injected I/O error")
        super().readinto(offset, buffers)


def kick_many(drv, q, chains):
    """Make every chain available, then one kick; returns the heads and the used entries."""
    heads = [q.add_chain(readable, writable) for readable, writable in chains]
    drv.kick(0)
    return heads, q.take_used()


def test_adjacent_reads_of_one_kick_are_one_backend_read(image):
    original = image.read_bytes()
    with CountingImage(image) as disk:
        dev, drv, q, feats, irq = setup(disk)
        # Sectors 4-5, 6-9, 10 (adjacent), then 20 (not), then a write, then 21 again.
        chains = [([hdr(B.VIRTIO_BLK_T_IN, 4)], [1024, 1]),
                  ([hdr(B.VIRTIO_BLK_T_IN, 6)], [512, 1536, 1]),
                  ([hdr(B.VIRTIO_BLK_T_IN, 10)], [512, 1]),
                  ([hdr(B.VIRTIO_BLK_T_IN, 20)], [512, 1]),
                  ([hdr(B.VIRTIO_BLK_T_OUT, 30), b"w" * 512], [1]),
                  ([hdr(B.VIRTIO_BLK_T_IN, 21)], [512, 1])]
        heads, used = kick_many(drv, q, chains)
        assert used == [(heads[0], 1025), (heads[1], 2049), (heads[2], 513), (heads[3], 513),
                        (heads[4], 1), (heads[5], 513)]
        assert disk.calls == [(4 * 512, 7 * 512), (20 * 512, 512), (21 * 512, 512)]
        for head, (sector, n) in zip(heads, ((4, 2), (6, 4), (10, 1), (20, 1))):
            assert q.written(head) == original[sector * 512:(sector + n) * 512] + b"\0"
        assert q.written(heads[5]) == original[21 * 512:22 * 512] + b"\0"
        assert dev.requests == 6 and dev.queue_errors == 0


def test_a_failed_merged_read_is_redone_request_by_request(image):
    original = image.read_bytes()
    with CountingImage(image) as disk:
        dev, drv, q, feats, irq = setup(disk)
        disk.fail = 2      # the merged read and the first request's own read fail
        chains = [([hdr(B.VIRTIO_BLK_T_IN, s)], [512, 1]) for s in (1, 2, 3)]
        heads, used = kick_many(drv, q, chains)
        assert disk.calls == [(512, 1536), (512, 512), (1024, 512), (1536, 512)]
        assert [h for h, _ in used] == heads
        assert q.written(heads[0])[-1] == B.VIRTIO_BLK_S_IOERR
        for head, sector in zip(heads[1:], (2, 3)):
            assert q.written(head) == original[sector * 512:(sector + 1) * 512] + b"\0"
        assert dev.errors["host I/O error"] == 1


def test_plain_read_with_its_status_byte_outside_ram_is_dropped(image):
    with DiskImage(image) as disk:
        dev, drv, q, feats, irq = setup(disk)
        hdr_addr, buf = drv.alloc.alloc(16), drv.alloc.alloc(512)
        drv.mem.write(hdr_addr, hdr(B.VIRTIO_BLK_T_IN, 0))
        head = q.add_segments([(hdr_addr, 16, False), (buf, 512, True), (RAM + 4096, 1, True)])
        drv.kick(0)
        assert q.take_used() == [(head, 0)]
        assert dev.queue_errors == 1


# ---- the short way for plain reads must agree with the long way on every chain ----

def _run_chain(data_lens, mutations, rtype, sector, long_way_only):
    """A plain read (header, data buffers of `data_lens`, status byte) with `mutations` applied to
    its descriptors, kicked into a fresh device: what the guest can see afterwards."""
    disk = FakeDisk(SECTORS * 512)
    disk.buf[:] = bytes((i * 13 + i // 512) & 0xFF for i in range(SECTORS * 512))
    dev, drv, q, feats, irq = setup(disk)
    if long_way_only:
        dev._plain_rw = lambda head: None
    mem = drv.mem
    hdr_addr = drv.alloc.alloc(16)
    mem.write(hdr_addr, hdr(rtype, sector))
    descs = [[hdr_addr, 16, 1]] + [[drv.alloc.alloc(n or 1), n, 3] for n in data_lens] \
        + [[drv.alloc.alloc(1), 1, 2]]
    for i, field_, value in mutations:
        d = descs[i % len(descs)]
        if field_ == "addr":
            d[0] = RAM - 8 if value % 2 else RAM + value
        elif field_ == "len":
            d[1] = value
        elif field_ == "flags":
            d[2] = value & 0xFFFF
    idx = q._take_descs(len(descs))
    nexts = [idx[i + 1] if i + 1 < len(descs) else 0 for i in range(len(descs))]
    for i, field_, value in mutations:
        if field_ == "next":
            nexts[i % len(descs)] = value & 0xFFFF
    for i, (addr, length, flags) in enumerate(descs):
        q.set_desc(idx[i], addr, length, flags, nexts[i])
    q.publish(idx[0])
    drv.kick(0)
    return q.take_used(), bytes(mem.view(0, RAM)), dict(dev.errors), dev.queue_errors


mutation = st.tuples(st.integers(0, 5),
                     st.sampled_from(["addr", "len", "flags", "next"]),
                     st.sampled_from([0, 1, 2, 3, 4, 7, 8, 9, 11, 15, 16, 511, 512, 4096, 0xFFFF,
                                      2**32 - 1]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data_lens=st.lists(st.sampled_from([512, 1024, 4096, 0, 100]), min_size=0, max_size=4),
       mutations=st.lists(mutation, max_size=2),
       rtype=st.sampled_from([B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_OUT, 4]),
       sector=st.one_of(st.integers(0, SECTORS + 2), st.integers(0, 2**64 - 1)))
def test_short_way_agrees_with_the_long_way(data_lens, mutations, rtype, sector):
    """Whatever the chain, taking the short way for plain reads (or declining it) leaves guest
    memory, the used ring and the error counts exactly as the long way alone does."""
    assert _run_chain(data_lens, mutations, rtype, sector, False) == \
        _run_chain(data_lens, mutations, rtype, sector, True)



def test_get_id_does_not_name_the_host_file(tmp_path):
    """Without a serial, GET_ID gives a fixed name, not the image's file name on the host."""
    path = tmp_path / "secret-host-name.img"
    path.write_bytes(bytes(4096))
    with DiskImage(path) as disk:
        dev, drv, q, feats, irq = setup(disk)
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_GET_ID)], [20, 1])
        assert q.written(head) == b"pykvm-disk".ljust(20, b"\0") + b"\0"


# ---- a model of the disk: reads return what earlier writes put there ----

def _split(data_len, cuts):
    """data_len bytes cut into segments at the given fractions (each piece non-empty)."""
    points = sorted({int(data_len * c) for c in cuts if 0 < int(data_len * c) < data_len})
    edges = [0, *points, data_len]
    return [b - a for a, b in zip(edges, edges[1:])]


request = st.tuples(
    st.sampled_from([B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_OUT, B.VIRTIO_BLK_T_OUT,
                     B.VIRTIO_BLK_T_FLUSH, B.VIRTIO_BLK_T_GET_ID, 77]),
    st.one_of(st.integers(0, SECTORS + 1), st.sampled_from([2**64 - 1, 2**63, SECTORS - 1])),
    st.integers(0, 4),                                              # sectors of data
    st.lists(st.floats(0, 1), max_size=3),                          # where the segments split
    st.integers(0, 255))                                            # the byte written


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(request, min_size=1, max_size=12))
def test_fuzz_requests_against_a_disk_model(requests):
    """Statuses by VIRTIO 1.2 5.2.6 (OK in range, IOERR past the capacity, UNSUPP for an unknown
    type), the bytes an IN returns equal to a bytearray model of the disk that OUTs update, and
    the disk equal to the model at the end. The oracle is slicing, not the device's code."""
    disk = FakeDisk(SECTORS * 512)
    disk.buf[:] = bytes((i * 13 + i // 512) & 0xFF for i in range(SECTORS * 512))
    model = bytearray(disk.buf)
    dev, drv, q, feats, irq = setup(disk, serial="fuzz")
    for rtype, sector, n, cuts, fill in requests:
        data_len = n * 512
        in_range = sector + n <= SECTORS
        if rtype == B.VIRTIO_BLK_T_OUT:
            payload = bytes([fill]) * data_len
            pieces, pos = [], 0
            for ln in _split(data_len, cuts):
                pieces.append(payload[pos:pos + ln])
                pos += ln
            head, used = submit(drv, q, [hdr(rtype, sector), *pieces], [1])
            status = q.written(head)[-1]
            assert status == (B.VIRTIO_BLK_S_OK if in_range else B.VIRTIO_BLK_S_IOERR)
            if status == B.VIRTIO_BLK_S_OK:
                model[sector * 512:sector * 512 + data_len] = payload
        elif rtype == B.VIRTIO_BLK_T_IN:
            head, used = submit(drv, q, [hdr(rtype, sector)], [*_split(data_len, cuts), 1])
            got = q.written(head)
            assert got[-1] == (B.VIRTIO_BLK_S_OK if in_range else B.VIRTIO_BLK_S_IOERR)
            if in_range:
                assert got[:-1] == bytes(model[sector * 512:sector * 512 + data_len])
                assert used == data_len + 1
        elif rtype == B.VIRTIO_BLK_T_FLUSH:
            head, used = submit(drv, q, [hdr(rtype, 0)], [1])
            assert q.written(head) == bytes([B.VIRTIO_BLK_S_OK])
        elif rtype == B.VIRTIO_BLK_T_GET_ID:
            head, used = submit(drv, q, [hdr(rtype, 0)], [20, 1])
            assert q.written(head) == b"fuzz".ljust(20, b"\0") + bytes([B.VIRTIO_BLK_S_OK])
        else:
            head, used = submit(drv, q, [hdr(rtype, sector)], [1])
            assert q.written(head) == bytes([B.VIRTIO_BLK_S_UNSUPP])
        assert disk.buf == model
