"""virtio-blk's common requests served in C, in the vCPU's run loop (csrc/virtio_blk_fast.h).

    fast = BlkFastPath(transport, VblkStruct(transport.mem, base))   # attach_mmio does this
    machine.fast.bind_virtio_blk(fast)      # on a Machine(fast_path=True)

A kick (the guest's write to QueueNotify) is an MMIO exit. With this bound, the C run loop looks at
it first: if the path is armed, C walks the queue itself - adjacent plain reads merged into one
preadv, adjacent writes into one pwritev, flushes with fsync, straight between the disk image and
guest RAM - fills the used ring and raises the interrupt, and the vCPU goes back into the guest
without the interpreter. What C does not do (any request with a mistake in it, GET_ID, DISCARD, an
I/O error, an interrupt line that is not a KVM irqfd) it hands back: `finish()` lets the Python
model, which stays the reference, carry on from the first request C did not finish.

One copy of the state: the queue's `last_avail`/`next_used`, the transport's `interrupt_status` and
the line's `level` move into the C struct (pykvm/devices/shared.py), so the Python objects and C
read and write the same memory. What C copies - the ring addresses, the disk - is copied when
Python arms the path, which it does after serving a kick itself with everything healthy; a guest
write to any other register of the device disarms it (in C), and so does a device reset (here).
Whoever changes a queue's addresses behind the transport's back (a snapshot restore) calls
`disarm()`.

This module is the Python half, and touches no compiled code: when C may serve the queue, what
it shares, what to do with what C leaves. The struct and the call into C are the binding's
(`VblkStruct`, pykvm/kvm/vblk.py), handed in by whoever wires the device to a Machine.

Why in the run loop and not on an ioeventfd thread: on the 2-core KVM-PVM hosts this project runs
on, a kick served by another thread waits for a core that the guest's polling vCPU and everyone
else's work hold, while the run loop serves it on the vCPU's own thread the moment the exit
arrives, and a guest waiting for its I/O has nothing better to do with the core. Measured with this
same C code called from an ioeventfd worker thread instead: 0.21-0.22x of host pread, against
0.49-0.78x from the run loop (bench/virtio_blk.py's docstring has the run).

But the kick's exit itself is the cost a streaming guest pays per batch (~50 us from guest CPL3
on KVM-PVM). So, with `poll_us` (attach_mmio gives BLK_POLL_US), a thread of C's takes over after
a kick the run loop served: for `poll_us` past the last batch it served, it polls the available
ring with VRING_USED_F_NO_NOTIFY set, and the driver does not kick (csrc/virtio_blk_poll.h, the
vhost busy-poll idea). It needs a core of its own, so it polls only while the host has one free
and stops when the kernel takes its core; the kicks carry the load otherwise. It never runs beside
Python: the run loop ends its window before it returns, and what only Python serves makes the
thread kick the vCPU out of KVM_RUN.
"""

from __future__ import annotations

from pykvm.devices.shared import share_attributes
from pykvm.host.disk import DiskImage

from . import blk as _blk
from .device import VIRTIO_INT_VRING, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK
from .mmio import QUEUE_NOTIFY


class BlkFastPath:
    """Serving one VirtioBlk behind one VirtioMmio transport in C, through `vblk` (a
    pykvm.kvm.vblk.VblkStruct for the transport's register page)."""

    def __init__(self, transport, vblk, *, poll_us: int = 0, kick_signal: int | None = None,
                 poll_yields: bool = True):
        """poll_us > 0: after each kick C serves, a thread of C's polls the queue for that long
        past the last batch it served (csrc/virtio_blk_poll.h), with the driver told not to kick;
        kick_signal (pykvm.kvm.KICK_SIGNAL, with the Machine's no-op handler installed) is how it
        gets the vCPU out of KVM_RUN when Python must take over; poll_yields=False: a window
        does not end when the thread loses its core (tests; see VblkStruct.start_polling)."""
        device = transport.device
        if not isinstance(device, _blk.VirtioBlk):
            raise TypeError(f"{device.name}: only virtio-blk is served in C")
        self.transport = transport
        self.device = device
        self.vblk = vblk
        self.block = vblk.c                 # the struct: C's run loop is given this
        vblk.set_limits(max_request=_blk.MAX_REQUEST_BYTES, merge_max_bytes=_blk.MERGE_MAX_BYTES,
                        merge_max_buffers=_blk.MERGE_MAX_BUFFERS)
        # One copy of what both sides change.
        share_attributes(device.queues[0], self.block, (("last_avail", "last_avail"),
                                                        ("next_used", "next_used")))
        share_attributes(transport, self.block, (("interrupt_status", "interrupt_status"),))
        line = transport.irq
        # An eventfd line (pykvm.irq.IrqfdLine, or a test's stand-in): C raises it itself.
        if hasattr(line, "fd") and hasattr(line, "level"):
            share_attributes(line, self.block, (("level", "irq_level"),))
            vblk.use_irqfd(line.fd)
        device._fast = self
        if poll_us > 0:
            if kick_signal is None:
                raise ValueError("polling needs the signal that kicks the vCPU")
            try:
                vblk.start_polling(poll_us, kick_signal, yields=poll_yields)
            except OSError as e:
                # The thread only spares the guest its kicks. If the host will not give us one
                # (pthread_create's EAGAIN: a pids cgroup, RLIMIT_NPROC, no room for its stack),
                # every batch is a kick, served on the vCPU's thread as without polling.
                _blk.log.warning("%s; without it every batch is a kick", e.strerror)

    # ---- arming ----
    def arm(self) -> None:
        """Copy the queue and the disk into the struct and let C serve kicks, if all is healthy:
        the driver is running (DRIVER_OK, no DEVICE_NEEDS_RESET), queue 0 is live and not broken,
        and the disk is a plain image file (no copy-on-write overlay)."""
        dev, t = self.device, self.transport
        q = dev.queues[0]
        disk = dev.disk
        if not (dev.active and q.ready and not q.broken and t.status & STATUS_DRIVER_OK
                and not t.status & STATUS_DEVICE_NEEDS_RESET and isinstance(disk, DiskImage)
                and not disk.snapshot and disk.fd >= 0):
            self.vblk.disarm()
            return
        self.vblk.arm(qsize=q.size, desc_addr=q.desc_addr, avail_addr=q.avail_addr,
                      used_addr=q.used_addr, fd=disk.fd, capacity=dev.capacity,
                      readonly=bool(dev.readonly), indirect=bool(q.indirect),
                      flush_syncs=not (disk.readonly or disk.snapshot))

    def disarm(self) -> None:
        self.vblk.disarm()

    @property
    def armed(self) -> bool:
        return self.vblk.armed

    # ---- after C ----
    def finish(self) -> None:
        """What C left for Python after a kick (the run loop returned PYKVM_FAST_VBLK): serve the
        rest of the queue the Python way, and raise the interrupt on a line C cannot drive."""
        need_python, need_irq = self.vblk.take_need()
        if need_python:
            self.transport.write(QUEUE_NOTIFY, 4, 0)
        if need_irq:
            self.transport._interrupt(VIRTIO_INT_VRING)

    def kick(self) -> None:
        """What the run loop does with a guest's QueueNotify write of queue 0, without a vCPU:
        C if armed, else the transport (for tests, and for reading this module)."""
        if self.vblk.armed:
            if self.vblk.notify():
                self.finish()
        else:
            self.transport.write(QUEUE_NOTIFY, 4, 0)

    def settle(self) -> None:
        """What the run loop does before Python gets control (csrc/fastpath.h): end the polling
        window, serve what was made available meanwhile, then hand Python what C left. For tests,
        which play the vCPU."""
        self.vblk.close_window()
        self.finish()

    def close(self) -> None:
        """Stop the polling thread (the device is going away)."""
        self.vblk.close()

    @property
    def requests(self) -> int:
        """Requests C served."""
        return self.vblk.requests

    @property
    def polled(self) -> int:
        """Batches the polling thread served."""
        return self.vblk.polled
