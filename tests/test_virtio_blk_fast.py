"""The C virtio-blk path (csrc/virtio_blk_fast.h, pykvm/virtio/blk_fast.py) held to the Python
model: no /dev/kvm needed, the C code is called through cffi on guest RAM in bytearrays.

Two worlds are built the same way - guest RAM in two regions with a gap, a disk image file, a
VirtioBlk behind a VirtioMmio, a driver that brought it up - and fed the same generated request
streams, hostile requests included (buffers outside RAM, chains that loop or run off the table,
lengths that are not whole sectors, requests past the end, writes to a read-only disk, unknown
types, indirect descriptors, heads outside the table, avail indices that jump). World A kicks the
Python model; world B kicks through the C path, which serves what it can and hands the rest to
the same Python model. After every kick, everything a guest or the VMM can see must be equal:
guest RAM (used ring, statuses, data), the disk file, the queue's indices and error counts, the
device's error counts and status, InterruptStatus and the interrupt line's edges.

What is not generated, on purpose: a request's device-writable data buffer that overlaps the
queue's own structures or another request's header or status byte (a guest corrupting its queue
in the middle of a batch). C and Python both stay inside guest RAM there, but may see the
corruption at different moments, as Python's merged reads already do against unmerged ones.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pykvm.irq import IrqLine, RecordingIrqLine
from pykvm.kvm._lib import ffi, lib
from pykvm.kvm.vblk import VblkStruct
from pykvm.memory import BytesBackend, GuestMemory, Region
from pykvm.virtio import blk as B
from pykvm.virtio import queue as Q
from pykvm.virtio.blk_fast import BlkFastPath
from pykvm.virtio.mmio import INTERRUPT_ACK, VirtioMmio
from pykvm.virtio.mock import MmioDriver

from conftest import needs_kvm

SECTOR = 512
DISK_SECTORS = 64
QSIZE = 16
LOW = 0x10000                  # region 0: [0, LOW)
HIGH_BASE, HIGH = 1 << 20, 0x8000   # region 1: [1 MiB, 1 MiB + 32 KiB); a gap between
HDR_AREA, STATUS_AREA, IND_AREA = 0x6000, 0x7000, 0x7400   # IND_AREA: 8 indirect tables
DATA_LOW = (0x8000, LOW)                     # data buffers: the top of region 0 ...
DATA_HIGH = (HIGH_BASE, HIGH_BASE + HIGH)    # ... and all of region 1
OUTSIDE = (LOW + 0x100, HIGH_BASE - 0x10, HIGH_BASE + HIGH - 4, 1 << 40, (1 << 64) - 8)


def test_header_constants_agree_with_the_python_model():
    assert (lib.VIRTIO_BLK_T_IN, lib.VIRTIO_BLK_T_OUT, lib.VIRTIO_BLK_T_FLUSH,
            lib.VIRTIO_BLK_T_GET_ID) == (B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_OUT,
                                         B.VIRTIO_BLK_T_FLUSH, B.VIRTIO_BLK_T_GET_ID)
    assert (lib.VIRTIO_BLK_S_OK, lib.VIRTIO_BLK_S_IOERR, lib.VIRTIO_BLK_S_UNSUPP) == (
        B.VIRTIO_BLK_S_OK, B.VIRTIO_BLK_S_IOERR, B.VIRTIO_BLK_S_UNSUPP)
    assert (lib.VRING_DESC_F_NEXT, lib.VRING_DESC_F_WRITE, lib.VRING_DESC_F_INDIRECT,
            lib.VRING_AVAIL_F_NO_INTERRUPT) == (Q.VIRTQ_DESC_F_NEXT, Q.VIRTQ_DESC_F_WRITE,
                                                Q.VIRTQ_DESC_F_INDIRECT,
                                                Q.VRING_AVAIL_F_NO_INTERRUPT)
    assert lib.VRING_USED_F_NO_NOTIFY == Q.VRING_USED_F_NO_NOTIFY
    from pykvm.virtio import mmio as M
    from pykvm.virtio.device import VIRTIO_INT_VRING
    assert (lib.VIRTIO_MMIO_QUEUE_NOTIFY, lib.VIRTIO_MMIO_INTERRUPT_ACK,
            lib.VIRTIO_MMIO_INT_VRING) == (M.QUEUE_NOTIFY, M.INTERRUPT_ACK, VIRTIO_INT_VRING)


# ---------------------------------------------------------------- the one door, in C

u64 = st.integers(0, (1 << 64) - 1)
near_edges = st.one_of(u64, st.integers(0, 0x30000), st.integers((1 << 64) - 0x1000,
                                                                  (1 << 64) - 1))


@settings(max_examples=400, deadline=None)
@given(regions=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 0x2000)),
                        min_size=1, max_size=4),
       top=st.booleans(), ranges=st.lists(st.tuples(near_edges, near_edges), max_size=20))
def test_c_locate_agrees_with_guest_memory(regions, top, ranges):
    """pykvm_mem_locate finds a range exactly when GuestMemory does, at the same offset, with
    64-bit addresses and sizes that would wrap a careless sum."""
    spans, at = [], 0
    for gap, size in regions:
        spans.append((at + gap, size))
        at += gap + size
    if top:     # the last region ends at the top of the address space
        gpa, size = spans[-1]
        spans[-1] = ((1 << 64) - size, size)
        if len(spans) > 1 and spans[-2][0] + spans[-2][1] > spans[-1][0]:
            spans.pop(-2)
    mem = GuestMemory([Region(gpa, size, BytesBackend(size)) for gpa, size in spans])
    c = ffi.new("struct pykvm_guest_mem *")
    hosts = []
    for i, (gpa, view) in enumerate(mem.spans()):
        hosts.append(ffi.from_buffer(view[:]))
        c.r[i].gpa, c.r[i].size, c.r[i].host = gpa, len(view), ffi.cast("uint8_t *", hosts[-1])
    c.n = len(spans)
    for gpa, size in ranges + [(g, s) for g, s in spans] + [(g + s, 0) for g, s in spans
                                                          if g + s < 1 << 64]:
        p = lib.pykvm_mem_locate(c, gpa, size)
        try:
            view, off = mem.locate(gpa, size)
        except Exception:
            assert p == ffi.NULL, (hex(gpa), size)
            continue
        assert p != ffi.NULL, (hex(gpa), size)
        i = next(i for i, (_, v) in enumerate(mem.spans()) if v.obj is view.obj)
        assert int(ffi.cast("uintptr_t", p)) - int(ffi.cast("uintptr_t", c.r[i].host)) == off


# ---------------------------------------------------------------- C + Python against Python

class EventfdLine(IrqLine):
    """A line that raises like pykvm.irq.IrqfdLine (an eventfd write per rising edge), on an
    eventfd with no VM behind it: the C path writes it itself."""

    def __init__(self):
        super().__init__()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def _raise_level(self, level: bool) -> None:
        if level:
            os.eventfd_write(self.fd, 1)

    def edges(self) -> int:
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0


class World:
    def __init__(self, tmp: str, name: str, disk: bytes, readonly: bool, fast: bool,
                 eventfd: bool, indirect: bool = True, poll_us: int = 0,
                 poll_yields: bool = True):
        from pykvm.host.disk import DiskImage
        self.path = os.path.join(tmp, name)
        with open(self.path, "wb") as f:
            f.write(disk)
        self.mem = GuestMemory([Region(0, LOW, BytesBackend(LOW)),
                                Region(HIGH_BASE, HIGH, BytesBackend(HIGH))])
        self.disk = DiskImage(self.path, readonly=readonly)
        self.dev = B.VirtioBlk(self.disk, serial="prop", queue_size=QSIZE)
        self.line = EventfdLine() if eventfd else RecordingIrqLine()
        self.t = VirtioMmio(self.dev, self.mem, self.line)
        # poll_us: C's polling thread too (csrc/virtio_blk_poll.h). There is no vCPU here: what
        # it would kick the vCPU out for stays in the struct's `need` until settle() (the run
        # loop's part, which the test plays).
        self.fast = BlkFastPath(self.t, VblkStruct(self.mem, 0xD0000000), poll_us=poll_us,
                                kick_signal=signal.SIGRTMIN if poll_us else None,
                                poll_yields=poll_yields) if fast else None
        self.drv = MmioDriver(self.t, self.mem, 0x1000, 0x6000)
        from pykvm.virtio.device import VIRTIO_F_INDIRECT_DESC
        self.drv.init(want=None if indirect else self.dev.device_features & ~VIRTIO_F_INDIRECT_DESC)
        assert self.dev.queues[0].indirect == indirect
        self.q = self.drv.queues[0]

    def kick(self) -> None:
        if self.fast is not None:
            self.fast.kick()
            self.fast.settle()      # the run loop's part before Python has control
        else:
            self.drv.kick(0)

    def close(self) -> None:
        if self.fast is not None:
            self.fast.close()
        self.disk.close()
        if isinstance(self.line, EventfdLine):
            os.close(self.line.fd)

    def seen(self) -> dict:
        q = self.dev.queues[0]
        with open(self.path, "rb") as f:
            disk = f.read()
        edges = self.line.edges() if isinstance(self.line, EventfdLine) else self.line.history
        return {
            "ram": bytes(self.mem.spans()[0][1]) + bytes(self.mem.spans()[1][1]),
            "disk": disk, "last_avail": q.last_avail, "next_used": q.next_used,
            "broken": q.broken, "queue_errors": q.errors, "kinds": dict(q.error_kinds),
            "dev_errors": dict(self.dev.errors), "requests": self.dev.requests
            + self.dev.fast_requests, "status": self.t.status,
            "interrupt_status": self.t.interrupt_status, "edges": edges,
            "transport_errors": dict(self.t.errors),
        }


MUTATIONS = ("hdr_oob", "hdr_short", "hdr_long", "data_oob", "data_zero_oob", "status_oob",
             "status_long", "no_status", "loop", "next_oob", "indirect", "extra_flag",
             "wrong_dir", "odd_len", "huge_len", "past_end", "head_oob",
             # for requests in an indirect table
             "ind_oob", "ind_len", "ind_zero", "ind_huge", "ind_with_next", "ind_write_flag")

request = st.fixed_dictionaries({
    "type": st.sampled_from([B.VIRTIO_BLK_T_IN] * 4 + [B.VIRTIO_BLK_T_OUT] * 3
                            + [B.VIRTIO_BLK_T_FLUSH, B.VIRTIO_BLK_T_GET_ID, 7]),
    "sector": st.one_of(st.sampled_from(["next", "next", "gap"]),
                        st.integers(0, DISK_SECTORS + 2)),
    "segs": st.lists(st.sampled_from([SECTOR, 2 * SECTOR, 4 * SECTOR, 0]), min_size=1,
                     max_size=3),
    "high": st.booleans(),
    "indirect": st.booleans(),
    "mutation": st.one_of(st.none(), st.sampled_from(MUTATIONS)),
    "wild": st.sampled_from(OUTSIDE),
    "fill": st.integers(0, 255),
})
kick = st.fixed_dictionaries({
    "requests": st.lists(request, min_size=0, max_size=5),
    "jump": st.integers(0, 30).map(lambda x: x == 0),      # rarely: avail.idx jumps
    "ack": st.booleans(),
    "no_interrupt": st.booleans(),
})


class Driver:
    """Lays out one kick's requests in a world's queue (the same bytes in every world)."""

    def __init__(self):
        self.desc = 0
        self.slot = 0
        self.next_sector = 0

    def lay_out(self, w: World, k: dict) -> None:
        q, mem = w.q, w.mem
        q.suppress_interrupts(k["no_interrupt"])
        arena = {False: DATA_LOW[0], True: DATA_HIGH[0]}
        for r in k["requests"]:
            m = r["mutation"]
            hdr = HDR_AREA + 16 * (self.slot % 64)
            status = STATUS_AREA + (self.slot % 64)
            self.slot += 1
            sector = {"next": self.next_sector, "gap": self.next_sector + 1}.get(r["sector"],
                                                                                 r["sector"])
            segs = list(r["segs"])
            if m == "odd_len":
                segs[0] += 100
            if m == "huge_len":
                segs[0] = (B.MAX_REQUEST_BYTES // len(segs)) + SECTOR
            if m == "past_end":
                sector = DISK_SECTORS - 1
            mem.write(hdr, struct.pack("<IIQ", r["type"], 0, sector))
            mem.write(status, b"\xee")
            write = r["type"] != B.VIRTIO_BLK_T_OUT
            hlen = {"hdr_short": 8, "hdr_long": 24}.get(m, 16)
            chain = [(r["wild"] if m == "hdr_oob" else hdr, hlen, Q.VIRTQ_DESC_F_NEXT)]
            if r["type"] != B.VIRTIO_BLK_T_FLUSH or m == "wrong_dir":
                for n in segs:
                    big = n > 0x4000
                    base = arena[r["high"]]
                    if base + n > (DATA_HIGH[1] if r["high"] else DATA_LOW[1]) or big:
                        base = arena[r["high"]] = DATA_LOW[0] if not r["high"] else DATA_HIGH[0]
                    if not big:
                        if write is False:
                            mem.write(base, bytes([(r["fill"] + i) & 0xFF for i in range(256)])
                                      * (n // 256) + bytes(n % 256))
                        arena[r["high"]] = base + n
                    flags = Q.VIRTQ_DESC_F_NEXT | (Q.VIRTQ_DESC_F_WRITE if write else 0)
                    if m == "wrong_dir":
                        flags ^= Q.VIRTQ_DESC_F_WRITE
                    chain.append((base, n, flags))
            if m == "data_oob" and len(chain) > 1:
                chain[1] = (r["wild"], chain[1][1] or SECTOR, chain[1][2])
            if m == "data_zero_oob" and len(chain) > 1:
                chain[1] = (r["wild"], 0, chain[1][2])
            slen = 2 if m == "status_long" else 1
            chain.append((status if m != "status_oob" else r["wild"], slen,
                          Q.VIRTQ_DESC_F_WRITE))
            if m == "no_status":
                chain.pop()
                a, n, f = chain[-1]
                chain[-1] = (a, n, f & ~Q.VIRTQ_DESC_F_NEXT)
            if m == "extra_flag":
                a, n, f = chain[0]
                chain[0] = (a, n, f | 8)
            if m == "indirect":
                a, n, f = chain[-1]
                chain[-1] = (a, 16, f | Q.VIRTQ_DESC_F_INDIRECT)
            if r["indirect"]:
                # The chain in its own table (indices from 0), one INDIRECT descriptor in the ring.
                table = IND_AREA + 128 * (self.slot % 8)
                idx = list(range(len(chain)))
                size = len(chain)
            else:
                idx = [(self.desc + i) % QSIZE for i in range(len(chain))]
                size = QSIZE
            for i, (a, n, f) in enumerate(chain):
                nxt = idx[i + 1] if i + 1 < len(idx) else 0
                if m == "loop" and i == len(chain) - 1:
                    f |= Q.VIRTQ_DESC_F_NEXT
                    nxt = idx[0]
                if m == "next_oob" and i == 0:
                    nxt = size + 3
                desc = struct.pack("<QIHH", a & ((1 << 64) - 1), n & 0xFFFFFFFF, f & 0xFFFF, nxt)
                if r["indirect"]:
                    mem.write(table + 16 * i, desc)
                else:
                    mem.write(q.desc_addr + 16 * idx[i], desc)
            if r["indirect"]:
                ilen = {"ind_len": 16 * size + 8, "ind_zero": 0,
                        "ind_huge": 16 * 40000}.get(m, 16 * size)
                iflags = Q.VIRTQ_DESC_F_INDIRECT | {
                    "ind_with_next": Q.VIRTQ_DESC_F_NEXT,
                    "ind_write_flag": Q.VIRTQ_DESC_F_WRITE}.get(m, 0)
                head = self.desc
                q.set_desc(head, r["wild"] if m == "ind_oob" else table, ilen, iflags,
                           (head + 1) % QSIZE)
                idx = [head]
                self.desc = (self.desc + 1) % QSIZE
            else:
                self.desc = (self.desc + len(chain)) % QSIZE
            if m == "head_oob":
                q.publish(QSIZE + 1)
            else:
                q.publish(idx[0])
            self.next_sector = sector + sum(segs) // SECTOR
        if k["jump"]:
            q.set_avail_idx((q.avail_idx + QSIZE + 1) & 0xFFFF)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(kicks=st.lists(kick, min_size=1, max_size=6), readonly=st.booleans(),
       eventfd=st.booleans(), seed=st.integers(0, 1 << 32), indirect=st.booleans(),
       poll=st.booleans())
def test_c_path_matches_the_python_model(kicks, readonly, eventfd, seed, indirect, poll):
    """poll: world B also has the polling thread, which takes the queue for a window after each
    kick C serves; the run loop's settle (end the window, serve what came meanwhile) runs before
    anything is compared."""
    disk = random.Random(seed).randbytes(DISK_SECTORS * SECTOR)     # no period: offsets show
    with tempfile.TemporaryDirectory(prefix="pykvm-vblk-fast-") as tmp:
        a = World(tmp, "a.img", disk, readonly, fast=False, eventfd=eventfd, indirect=indirect)
        b = World(tmp, "b.img", disk, readonly, fast=True, eventfd=eventfd, indirect=indirect,
                  poll_us=1000 if poll else 0)
        try:
            assert b.fast.armed, "DRIVER_OK served the (empty) queue and armed the C path"
            da, db = Driver(), Driver()
            for k in kicks:
                da.lay_out(a, k)
                db.lay_out(b, k)
                a.kick()
                b.kick()
                sa, sb = a.seen(), b.seen()
                assert sa == sb
                if k["ack"]:
                    for w in (a, b):
                        st_ = w.t.read(0x60, 4)
                        if st_:
                            w.t.write(INTERRUPT_ACK, 4, st_)
                    assert a.seen() == b.seen()
        finally:
            a.close()
            b.close()


def test_c_serves_plain_requests_and_python_serves_the_rest(tmp_path):
    """Not vacuous: on a plain stream C does the work (Python serves nothing), and a bad request
    in the middle goes to Python, which counts it, with C carrying on at the next kick."""
    disk = bytes(range(256)) * (DISK_SECTORS * SECTOR // 256)
    w = World(str(tmp_path), "c.img", disk, readonly=False, fast=True, eventfd=True)
    try:
        d = Driver()
        plain = {"type": B.VIRTIO_BLK_T_IN, "sector": 0, "segs": [SECTOR, SECTOR], "high": True,
                 "mutation": None, "wild": 0, "fill": 0, "indirect": False}
        write = dict(plain, type=B.VIRTIO_BLK_T_OUT, sector=8, fill=9)
        flush = dict(plain, type=B.VIRTIO_BLK_T_FLUSH)
        d.lay_out(w, {"requests": [plain, dict(plain, sector="next"), write, flush],
                      "jump": False, "no_interrupt": False})
        w.kick()
        assert (w.dev.requests, w.fast.requests) == (0, 4)
        assert w.fast.block.reads == 2 and w.fast.block.writes == 1
        assert w.fast.block.flushes == 1
        assert w.line.edges() == 1 and w.t.interrupt_status == 1 and w.line.level
        assert w.q.take_used() == [(0, 1025), (4, 1025), (8, 1), (12, 1)]
        with open(w.path, "rb") as f:
            f.seek(8 * SECTOR)
            assert f.read(2 * SECTOR) == bytes((9 + i) & 0xFF for i in range(256)) * 4
        bad = dict(plain, mutation="status_oob", wild=OUTSIDE[0])
        d.lay_out(w, {"requests": [plain, bad, plain], "jump": False, "no_interrupt": False})
        w.kick()
        assert w.fast.block.fallbacks == 1
        assert w.dev.requests == 3        # the bad one made Python redo the whole run
        assert w.q.take_used()[1][1] == 0 and w.dev.queues[0].error_kinds
        assert w.fast.armed              # Python served the kick and armed C again
        d.lay_out(w, {"requests": [plain], "jump": False, "no_interrupt": False})
        w.kick()
        assert (w.dev.requests, w.fast.requests) == (3, 5)
        # Linux's shape: every request in an indirect table; C serves reads, writes, flushes.
        d.lay_out(w, {"requests": [dict(plain, indirect=True), dict(write, indirect=True),
                                   dict(flush, indirect=True)],
                      "jump": False, "no_interrupt": False})
        w.kick()
        assert (w.dev.requests, w.fast.requests) == (3, 8)
        assert [n for _, n in w.q.take_used()] == [1025, 1025, 1, 1]  # the last kick's, these
        w.drv.w(0x70, 0)                 # reset: C lets go
        assert not w.fast.armed
    finally:
        w.close()


@needs_kvm
@pytest.mark.parametrize("cpus", [1, 2])
def test_c_path_is_bound_only_with_one_vcpu(tmp_path, cpus):
    """The C loop runs on vCPU 0 without the device's lock: with a second vCPU the Python model
    serves every kick (under its lock), or the two would race on the queue."""
    from pykvm.host.disk import DiskImage
    from pykvm.machine import Machine
    from pykvm.virtio import attach_mmio
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    with DiskImage(img) as disk, Machine(16 << 20, fast_path=True, cpus=cpus) as m:
        dev = B.VirtioBlk(disk)
        attach_mmio(m, dev, 0, ioeventfd=False)
        assert (m.fast.virtio_blk is not None) == (cpus == 1)
        assert (dev._fast is not None) == (cpus == 1)


# ---------------------------------------------------------------- the polling thread

def _threads() -> int:
    """This process's threads, C's own among them (the kernel's count)."""
    return len(os.listdir("/proc/self/task"))


@needs_kvm
def test_closing_the_machine_ends_the_polling_thread(tmp_path):
    """A disk attached and never closed by its owner, as test_c_path_is_bound_only_with_one_vcpu
    does: the polling thread C started at attach ends with the machine."""
    from pykvm.host.disk import DiskImage
    from pykvm.machine import Machine
    from pykvm.virtio import attach_mmio
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    with DiskImage(img) as disk:
        m = Machine(16 << 20, fast_path=True)
        try:
            before = _threads()
            dev = B.VirtioBlk(disk)
            attach_mmio(m, dev, 0)
            assert _threads() == before + 1, "attach started the polling thread"
        finally:
            m.close()
        assert _threads() == before
        dev.close()             # and its owner may still close it



# A guest reading a disk through the C path on a host that will not start the polling thread.
_NO_THREAD_GUEST = """
import os, sys, threading
threading.stack_size(1 << 20)       # Python's own threads (the run clock) are not what is tested
from pykvm.host.disk import DiskImage
from pykvm.testing.firmware import run_firmware
from pykvm.virtio import VirtioBlk, attach_mmio
from pykvm.x86 import layout
seen = {}
with DiskImage(sys.argv[1], readonly=True) as disk:
    def setup(m):
        seen["dev"] = VirtioBlk(disk)
        attach_mmio(m, seen["dev"], 0)
        seen["threads"] = len(os.listdir("/proc/self/task"))
    r = run_firmware("virtio_blk", args=[1, layout.VIRTIO_MMIO_BASE, 1 << 20, 128 << 10,
                                         32 << 10, 4], setup=setup, irqchip="kernel",
                     fast_path=True, timeout=60)
b = r.report("virtio_blk: bench")
print(r.status, seen["threads"], b["bytes"], b["notifies"], b["suppressed"], b["errors"],
      seen["dev"].fast_requests, seen["dev"]._fast.polled)
"""


@needs_kvm
def test_a_host_that_refuses_the_polling_thread_gets_kicks_served(tmp_path):
    """pthread_create fails (EAGAIN: a pids cgroup, RLIMIT_NPROC, or, provoked here, no room for
    the thread's stack: glibc sizes it from RLIMIT_STACK, read when the process starts). The disk
    still works, every batch a kick served in C; a warning says so, no traceback."""
    import resource
    import subprocess
    import sys
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(1 << 20))
    huge = 100 << 40            # 100 TiB: more than a 47-bit address space has free
    hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
    if hard != resource.RLIM_INFINITY and hard < huge:
        pytest.skip(f"the stack limit's hard maximum ({hard} bytes) is too low to provoke it")

    def limit_stack():
        resource.setrlimit(resource.RLIMIT_STACK, (huge, hard))
    p = subprocess.run([sys.executable, "-c", _NO_THREAD_GUEST, str(img)], preexec_fn=limit_stack,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "polling thread: Resource temporarily unavailable; without it every batch is a kick" \
        in p.stderr, p.stderr
    status, threads, nbytes, notifies, suppressed, errors, in_c, polled = map(int, p.stdout.split())
    assert (status, threads, nbytes, errors) == (0, 1, 1 << 20, 0)
    assert (notifies, suppressed, in_c, polled) == (2, 0, 8, 0)     # 2 batches of 4, both kicked


def _wait_for(cond, limit: float = 60.0) -> bool:
    """Wait for another thread's work (a bound for a hung test, not a measurement)."""
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True


_FENCE = threading.Lock()


def test_polling_thread_serves_what_the_driver_makes_available_without_a_kick(tmp_path):
    """After a kick C serves, the polling thread holds the queue with VRING_USED_F_NO_NOTIFY set;
    what the driver makes available then is served with no kick, exactly as the Python model
    serves it on one. A request only the Python model serves (GET_ID) makes the thread hand the
    queue over (it would kick the vCPU; here `need` waits for the run loop's part, settle) with
    notifications back on. The test is the driver and keeps the driver's rule (publish, fence,
    read the flag, kick if it is clear). The thread keeps its windows open when it loses its core
    here: this driver is a Python thread on a shared host, nothing like a guest's timing."""
    disk = bytes(range(256)) * (DISK_SECTORS * SECTOR // 256)
    a = World(str(tmp_path), "a.img", disk, readonly=False, fast=False, eventfd=True)
    b = World(str(tmp_path), "b.img", disk, readonly=False, fast=True, eventfd=True,
              poll_us=600_000_000, poll_yields=False)   # only a stop ends a window
    try:
        plain = {"type": B.VIRTIO_BLK_T_IN, "sector": "next", "segs": [SECTOR, SECTOR],
                 "high": True, "mutation": None, "wild": 0, "fill": 0, "indirect": False}
        write = dict(plain, type=B.VIRTIO_BLK_T_OUT, sector=8, fill=9)
        flush = dict(plain, type=B.VIRTIO_BLK_T_FLUSH)
        get_id = dict(plain, type=B.VIRTIO_BLK_T_GET_ID, segs=[SECTOR])
        da, db = Driver(), Driver()

        def polling() -> bool:
            return bool(b.mem.read_int(b.q.used_addr, 2) & Q.VRING_USED_F_NO_NOTIFY)

        def submit(*requests) -> bool:
            """Both worlds; True if world B's driver was told not to kick."""
            k = {"requests": list(requests), "jump": False, "no_interrupt": False}
            da.lay_out(a, k)
            a.drv.kick(0)
            db.lay_out(b, k)
            with _FENCE:                # a locked instruction: our stores before the flag's load
                pass
            if polling():
                return True
            b.fast.kick()               # served by C on this thread; then a window opens
            return False

        assert not submit(plain)        # no window before the first kick
        for _ in range(50):
            if _wait_for(polling, 1.0) and submit(plain, write, flush):
                break
            submit(plain)               # no window (or it ended): a kick, and a window follows
        else:
            pytest.fail("50 windows in a row ended before the driver's next batch")
        assert _wait_for(lambda: b.q.used_idx() == a.q.used_idx()), "the thread served nothing"
        assert b.fast.polled >= 1 and b.dev.requests == 0
        assert b.fast.block.writes >= 1 and b.fast.block.flushes >= 1
        for _ in range(50):
            if not _wait_for(polling, 1.0):
                submit(plain)           # a batch C serves: a window follows
                continue
            if submit(get_id):
                assert _wait_for(lambda: b.fast.block.need), "the thread kept the GET_ID"
                assert not polling()    # the driver kicks again while Python has the queue
                b.fast.settle()         # the run loop's part: Python serves it
                break
            b.fast.settle()             # kicked, and served by Python on this thread
        else:
            pytest.fail("50 windows in a row ended before the driver's next batch")
        b.fast.settle()
        assert b.dev.requests >= 1      # GET_ID, by the Python model
        assert a.seen() == b.seen()
    finally:
        a.close()
        b.close()
