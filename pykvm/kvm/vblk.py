"""`struct pykvm_vblk` (csrc/virtio_blk_fast.h): the C half of serving virtio-blk kicks in the run loop.

pykvm/virtio/blk_fast.py decides *when* C may serve a device's queue (`BlkFastPath`: arm after a
healthy kick, disarm on a reset, finish what C left). This module is the part that touches the
compiled module: it allocates the struct, lends C guest RAM as host pointers, copies in what C
reads when armed, calls C for a kick, and reads back the bits C leaves for Python. It knows nothing
of the Python device: it is given plain values.

    vblk = VblkStruct(mem, base, size)     # mem: pykvm.memory.GuestMemory; base/size: the MMIO page
    vblk.arm(qsize=..., desc_addr=..., ...)  # C may now serve kicks of this queue
    if vblk.notify():                      # what the run loop does on a QueueNotify exit
        need_python, need_irq = vblk.take_need()

`vblk.c` is the struct itself: the queue's indices, InterruptStatus and the line's level live in
it while the path is bound (pykvm/devices/shared.py moves the Python attributes there), and the C
run loop is given it through `FastPath.bind_virtio_blk` (pykvm/kvm/fastpath.py).
"""

from __future__ import annotations

import os

from ._lib import ffi, lib

MEM_REGIONS = lib.PYKVM_MEM_REGIONS


class VblkStruct:
    """One `struct pykvm_vblk` for the virtio-mmio register page at guest-physical `base`."""

    def __init__(self, mem, base: int, size: int = 0x1000):
        c = self.c = ffi.new("struct pykvm_vblk *")
        c.mmio_base, c.mmio_size = base, size
        c.irqfd = -1
        c.fd = -1
        self._quit = None
        # Guest RAM: the same regions GuestMemory has, as host pointers (csrc/guest_mem.h). Each is
        # exported from its own slice of the region's view: the export keeps the mapping alive for
        # as long as C can use the pointer (GuestMemory.close then leaves an mmap to go with this
        # object).
        spans = list(mem.spans())
        if len(spans) > MEM_REGIONS:
            raise ValueError(f"{len(spans)} RAM regions; the C path takes {MEM_REGIONS}")
        self._buffers = []
        for i, (gpa, view) in enumerate(spans):
            host = ffi.from_buffer(view[:])
            self._buffers.append(host)
            c.mem.r[i].gpa, c.mem.r[i].size = gpa, len(view)
            c.mem.r[i].host = ffi.cast("uint8_t *", host)
        c.mem.n = len(spans)

    def set_limits(self, *, max_request: int, merge_max_bytes: int, merge_max_buffers: int) -> None:
        """The Python model's limits, which C must keep to do exactly what it does."""
        c = self.c
        c.max_request = max_request
        c.merge_max_bytes = merge_max_bytes
        c.merge_max_buffers = merge_max_buffers

    def use_irqfd(self, fd: int) -> None:
        """Raise the interrupt by writing this KVM_IRQFD eventfd (else C leaves it to Python)."""
        self.c.irqfd = fd

    def arm(self, *, qsize: int, desc_addr: int, avail_addr: int, used_addr: int, fd: int,
            capacity: int, readonly: bool, indirect: bool, flush_syncs: bool) -> None:
        """Copy in the queue's addresses and the disk, and let C serve the next kicks."""
        c = self.c
        c.qsize = qsize
        c.desc_addr, c.avail_addr, c.used_addr = desc_addr, avail_addr, used_addr
        c.fd = fd
        c.capacity = capacity
        c.readonly = readonly
        c.indirect = indirect
        c.flush_syncs = flush_syncs
        c.armed = 1

    def disarm(self) -> None:
        self.c.armed = 0

    @property
    def armed(self) -> bool:
        return bool(self.c.armed)

    def start_polling(self, poll_us: int, kick_signal: int, *, yields: bool = True) -> None:
        """Start the polling thread (csrc/virtio_blk_poll.h): after each kick served in C it polls
        the available ring for `poll_us` microseconds past the last batch it served, with the
        driver told not to kick (VRING_USED_F_NO_NOTIFY). `kick_signal`: the signal that knocks the
        vCPU thread out of KVM_RUN (pykvm.kvm.vcpu.KICK_SIGNAL) when Python must take over.
        yields=False keeps a window open when the thread loses its core (for tests that play the
        driver from Python; a running VM always yields)."""
        if poll_us <= 0:
            return
        err = lib.pykvm_vblk_poll_start(self.c, poll_us, kick_signal, int(yields))
        if err < 0:
            raise OSError(-err, f"virtio-blk polling thread: {os.strerror(-err)}")
        if self._quit is None:
            # The thread holds a pointer to the struct: it ends before cffi frees the memory.
            self._quit = ffi.gc(self.c, lib.pykvm_vblk_poll_quit)

    def close_window(self) -> None:
        """End the polling thread's window, if one is open, and wait for it (the run loop does this
        before it returns to Python)."""
        lib.pykvm_vblk_poll_close(self.c)

    def close(self) -> None:
        """Stop the polling thread, if there is one."""
        lib.pykvm_vblk_poll_quit(self.c)

    @property
    def polled(self) -> int:
        """Batches the polling thread served (the guest made them available without a kick)."""
        return self.c.polled

    def notify(self) -> bool:
        """Serve a QueueNotify of queue 0 in C, as the run loop does; True if C left something for
        Python (see take_need)."""
        return bool(lib.pykvm_vblk_notify(self.c))

    def take_need(self) -> tuple[bool, bool]:
        """What C left after its last kick, and clear it: (serve the rest of the queue in Python,
        raise the interrupt on a line C cannot drive)."""
        need = self.c.need
        self.c.need = 0
        return bool(need & lib.PYKVM_VBLK_NEED_PYTHON), bool(need & lib.PYKVM_VBLK_NEED_IRQ)

    @property
    def requests(self) -> int:
        """Requests C served."""
        return self.c.requests
