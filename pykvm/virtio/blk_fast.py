"""virtio-blk's common requests served in C, in the vCPU's run loop (csrc/virtio_blk_fast.h).

    fast = BlkFastPath(transport, base)     # attach_mmio does this on a Machine(fast_path=True)
    machine.fast.regs.vblk = fast.block

A kick (the guest's write to QueueNotify) is an MMIO exit. With this bound, the C run loop looks at
it first: if the path is armed, C walks the queue itself - adjacent plain reads merged into one
preadv, adjacent writes into one pwritev, flushes with fsync, straight between the disk image and
guest RAM - fills the used
ring and raises the interrupt, and the vCPU goes back into the guest without the interpreter. What
C does not do (any request with a mistake in it, GET_ID, DISCARD, an I/O error, an interrupt
line that is not a KVM irqfd) it hands back: `finish()` lets the Python model,
which stays the reference, carry on from the first request C did not finish.

One copy of the state: the queue's `last_avail`/`next_used`, the transport's `interrupt_status` and
the line's `level` move into the C struct (pykvm/devices/shared.py), so the Python objects and C
read and write the same memory. What C copies - the ring addresses, the disk - is copied when
Python arms the path, which it does after serving a kick itself with everything healthy; a guest
write to any other register of the device disarms it (in C), and so does a device reset (here).
Whoever changes a queue's addresses behind the transport's back (a snapshot restore) calls
`disarm()`.

Why in the run loop and not on an ioeventfd thread: on the 2-core KVM-PVM hosts this project runs
on, a kick served by another thread waits for a core that the guest's polling vCPU and everyone
else's work hold, while the run loop serves it on the vCPU's own thread the moment the exit
arrives, and a guest waiting for its I/O has nothing better to do with the core. Measured with this
same C code called from an ioeventfd worker thread instead: 0.21-0.22x of host pread, against
0.49-0.78x from the run loop (bench/virtio_blk.py's docstring has the run).
"""

from __future__ import annotations

from pykvm.devices.shared import share_attributes
from pykvm.host.disk import DiskImage
from pykvm.kvm._lib import ffi, lib

from . import blk as _blk
from .device import VIRTIO_INT_VRING, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK
from .mmio import QUEUE_NOTIFY


class BlkFastPath:
    """The C struct for one VirtioBlk behind one VirtioMmio transport at guest-physical `base`."""

    def __init__(self, transport, base: int, size: int = 0x1000):
        device = transport.device
        if not isinstance(device, _blk.VirtioBlk):
            raise TypeError(f"{device.name}: only virtio-blk is served in C")
        self.transport = transport
        self.device = device
        b = self.block = ffi.new("struct pykvm_vblk *")
        b.mmio_base, b.mmio_size = base, size
        b.irqfd = -1
        b.fd = -1
        b.max_request = _blk.MAX_REQUEST_BYTES
        b.merge_max_bytes = _blk.MERGE_MAX_BYTES
        b.merge_max_buffers = _blk.MERGE_MAX_BUFFERS
        # Guest RAM: the same regions GuestMemory has, as host pointers. Each is exported from its
        # own slice of the region's view: the export keeps the mapping alive for as long as C
        # can use the pointer (GuestMemory.close then leaves an mmap to go with this object).
        mem = transport.mem
        spans = list(mem.spans())
        if len(spans) > lib.PYKVM_MEM_REGIONS:
            raise ValueError(f"{len(spans)} RAM regions; the C path takes "
                             f"{lib.PYKVM_MEM_REGIONS}")
        self._buffers = []
        for i, (gpa, view) in enumerate(spans):
            host = ffi.from_buffer(view[:])
            self._buffers.append(host)
            b.mem.r[i].gpa, b.mem.r[i].size = gpa, len(view)
            b.mem.r[i].host = ffi.cast("uint8_t *", host)
        b.mem.n = len(spans)
        # One copy of what both sides change.
        share_attributes(device.queues[0], b, (("last_avail", "last_avail"),
                                               ("next_used", "next_used")))
        share_attributes(transport, b, (("interrupt_status", "interrupt_status"),))
        line = transport.irq
        if hasattr(line, "fd") and hasattr(line, "level"):   # an IrqfdLine (pykvm.machine)
            share_attributes(line, b, (("level", "irq_level"),))
            b.irqfd = line.fd
        device._fast = self

    # ---- arming ----
    def arm(self) -> None:
        """Copy the queue and the disk into the struct and let C serve kicks, if all is healthy:
        the driver is running (DRIVER_OK, no DEVICE_NEEDS_RESET), queue 0 is live and not broken,
        and the disk is a plain image file (no copy-on-write overlay)."""
        b, dev, t = self.block, self.device, self.transport
        q = dev.queues[0]
        disk = dev.disk
        if not (dev.active and q.ready and not q.broken and t.status & STATUS_DRIVER_OK
                and not t.status & STATUS_DEVICE_NEEDS_RESET and isinstance(disk, DiskImage)
                and not disk.snapshot and disk.fd >= 0):
            b.armed = 0
            return
        b.qsize = q.size
        b.desc_addr, b.avail_addr, b.used_addr = q.desc_addr, q.avail_addr, q.used_addr
        b.fd = disk.fd
        b.capacity = dev.capacity
        b.readonly = bool(dev.readonly)
        b.indirect = bool(q.indirect)
        b.flush_syncs = not (disk.readonly or disk.snapshot)
        b.armed = 1

    def disarm(self) -> None:
        self.block.armed = 0

    @property
    def armed(self) -> bool:
        return bool(self.block.armed)

    # ---- after C ----
    def finish(self) -> None:
        """What C left for Python after a kick (the run loop returned PYKVM_FAST_VBLK): serve the
        rest of the queue the Python way, and raise the interrupt on a line C cannot drive."""
        need = self.block.need
        self.block.need = 0
        if need & lib.PYKVM_VBLK_NEED_PYTHON:
            self.transport.write(QUEUE_NOTIFY, 4, 0)
        if need & lib.PYKVM_VBLK_NEED_IRQ:
            self.transport._interrupt(VIRTIO_INT_VRING)

    def kick(self) -> None:
        """What the run loop does with a guest's QueueNotify write of queue 0, without a vCPU:
        C if armed, else the transport (for tests, and for reading this module)."""
        if self.block.armed:
            if lib.pykvm_vblk_notify(self.block):
                self.finish()
        else:
            self.transport.write(QUEUE_NOTIFY, 4, 0)

    @property
    def requests(self) -> int:
        """Requests C served."""
        return self.block.requests
