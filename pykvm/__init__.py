"""pykvm: a virtual machine monitor in Python on Linux KVM.

How a VM comes to life, and where each step lives:

1. Open /dev/kvm and check the API version (`pykvm.kvm.Kvm`).
2. Create a VM (KVM_CREATE_VM) and give it RAM: host memory mapped by us and registered as memory
   slots (`pykvm.memory.GuestMemory`, `Vm.set_user_memory_region`).
3. Create the platform: an interrupt controller and timer (in-kernel, or our Python i8259/i8254), and
   devices on the port-I/O and MMIO buses (`pykvm.bus.Bus`, `pykvm.devices`, `pykvm.virtio`). A
   device sees only register offsets and an interrupt line (`pykvm.irq`); every fixed port, IRQ and
   address is in `pykvm.x86.layout`.
4. Create a vCPU (KVM_CREATE_VCPU), mmap its shared `kvm_run` page, and set its registers: real mode
   for a firmware program, or 64-bit long mode with page tables and a GDT for a Linux kernel
   (`pykvm.x86.cpu`, `pykvm.boot`).
5. Loop on KVM_RUN. Each return is an *exit*: the guest did something the hardware could not finish
   alone (an `out` to a port, a load from MMIO, `hlt`). `Vcpu.run()` turns it into a typed value
   (`pykvm.kvm.exits`), `pykvm.dispatch.handle_exit` dispatches it to the bus (`Machine`'s loop
   looks up the same handler table inline), and the loop goes on until something asks it to stop:
   a `pykvm.stop.Stop` with its `StopReason`.
6. Boot Linux: `pykvm.linux.LinuxVM` does steps 1-5 from a `pykvm.config.LinuxConfig`. It adds the
   PC's legacy devices (`pykvm.pc`), a PCI bus, disks and virtio devices; loads the kernel with the
   boot protocol (`pykvm.boot.load_linux`: parse the bzImage, unpack its payload on the host, write
   the zero page and command line); and enters it in long mode. On a KVM-PVM host (no VT-x/AMD-V:
   guest kernel code is emulated) `pykvm.pvm` adds kernel arguments and completes the instructions
   KVM's emulator lacks (docs/kvm-pvm.md has the measurements).
7. Virtio: a device model (`pykvm.virtio.blk`, `net`, `console`, `rng`) serves split virtqueues in
   guest RAM (`pykvm.virtio.queue`); a transport (`virtio.mmio` or `virtio.pci`) owns the registers;
   `pykvm.virtio.attach` puts the pair on the machine and returns the `VirtioAttachment` the VMM
   keeps. Host resources live in `pykvm.host` (disk images, tap devices, the terminal).
8. The fast path: most exits of a Linux boot are the serial console's polling and POST writes.
   `pykvm.kvm.fastpath` and csrc/fastpath.h run the KVM_RUN loop in C and answer those there; the
   device models keep the registers C reads in a shared struct (`pykvm.devices.shared`), so there is
   one copy of each. A virtio-blk disk's kicks are served in that loop too (csrc/virtio_blk_fast.h;
   its Python half `pykvm.virtio.blk_fast`, its C half `pykvm.kvm.vblk`). Everything else comes back
   to Python as in step 5 (`--no-fast-path` to watch).

Two walks through the code, in the order the files are reached.

One byte written to the UART's THR (`out 0x3f8`), with the fast path off:
    pykvm/kvm/vcpu.py        Vcpu.run: KVM_RUN returns KVM_EXIT_IO -> IoOut(0x3f8, 1, 1, b"A")
    pykvm/machine.py         Machine._vcpu_loop: the handler for IoOut, from dispatch.py's table
    pykvm/dispatch.py        _io_out -> pio.write(0x3f8, 1, 0x41)
    pykvm/bus.py             Bus.write: the device at 0x3f8 (LockedDevice), offset 0
    pykvm/devices/isa.py     ByteRegisters.write: one byte at offset 0
    pykvm/devices/serial.py  Serial16550: THR -> the output sink (LinuxVM: pykvm/console.py), then
                             the interrupt level recomputed from IER/LSR
    pykvm/irq.py             KvmIrqLine.set_level: only if the level changed
    pykvm/kvm/vm.py          Vm.irq_line: KVM_IRQ_LINE
  With the fast path on (LinuxVM's default) and the UART's interrupts off, every step up to the
  Serial16550 is csrc/fastpath.h, which buffers the byte; pykvm/kvm/fastpath.py drains it to the
  same sink.

One virtio-blk read, LinuxVM's default (virtio-mmio, one vCPU, the fast path on):
    (guest)                  writes the queue index to QueueNotify: an MMIO exit
    csrc/fastpath.h          pykvm_run_fast: the exit is at the disk's QueueNotify and C is armed
    csrc/virtio_blk_poll.h   pykvm_vblk_notify: take the queue (unless the polling thread holds it)
    csrc/virtio_blk_fast.h   pykvm_vblk_serve: for each request, pop its head, find the header and
                             buffers in guest RAM (csrc/guest_mem.h, bounds-checked), preadv from
                             the image straight into them, write the status and the used entry;
                             then InterruptStatus, and a write to the line's KVM irqfd
    csrc/virtio_blk_poll.h   vblk_poll_window: then C's own thread takes the queue and sets
                             NO_NOTIFY in the used ring; requests the guest makes available
                             meanwhile it serves with pykvm_vblk_serve, with no kick and no exit
                             (only while the host has a core free for it)
    (guest)                  back in KVM_RUN without the interpreter; KVM pulses the GSI
  The same read through the Python model: the first kick after the driver starts (serving it arms
  C: pykvm/virtio/blk_fast.py), whatever C hands back (a request with a mistake, GET_ID, an I/O
  error), and every kick with the fast path off or several vCPUs, where KVM catches the kick on an
  ioeventfd and the vCPU goes on without an exit:
    pykvm/virtio/attach.py   IoEventNotifier: its thread wakes, device.notify(0) under the lock
    pykvm/virtio/device.py   VirtioDevice.notify -> process_queue
    pykvm/virtio/blk.py      VirtioBlk.process_queue: for each request, pop its head
                             (virtio/queue.py, bounds-checked), find the header and buffers in guest
                             RAM (pykvm/memory.py), read the disk straight into them
                             (pykvm/host/disk.py: preadv), write the status and the used entry
    pykvm/virtio/device.py   signal_used -> VirtioTransport._interrupt: InterruptStatus bit set
    pykvm/virtio/mmio.py     VirtioMmio._update_interrupt: the line's level from InterruptStatus
    pykvm/irq.py             IrqfdLine: an eventfd write; KVM pulses the GSI
  (With the fast path on, the first kick and what C hands back arrive as an MMIO exit instead:
  dispatch.py's _mmio_write -> bus.py -> VirtioMmio.write(QueueNotify) -> VirtioDevice.notify.)

Where to read next: examples/ (numbered, from eight bytes of real mode to a Linux boot), then
pykvm/machine.py and pykvm/kvm/, then a device (pykvm/devices/serial.py) with its unit tests, then
pykvm/linux.py. README.md's table maps the rest.
"""
__version__ = "0.1.0"


def __getattr__(name):
    # `from pykvm import LinuxVM, Machine` without making `import pykvm` load everything.
    if name == "LinuxVM":
        from .linux import LinuxVM
        return LinuxVM
    if name == "Machine":
        from .machine import Machine
        return Machine
    raise AttributeError(f"module 'pykvm' has no attribute {name!r}")


__all__ = ["LinuxVM", "Machine", "__version__"]
