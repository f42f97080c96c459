"""Putting a virtio device on a machine.

    attached = attach_mmio(machine, VirtioBlk(DiskImage("disk.img")), 0)
    cmdline.add(*attached.kernel_arg.split("=", 1))
    ...
    attached.close()          # the ioeventfd thread, then the device's own resources

Both ways of attaching return a `VirtioAttachment`: the device, its transport, its IRQ, the kernel
argument (virtio-mmio) and the ioeventfd notifier (if any). Whoever attaches keeps it, `start()`s it
before running the guest and `close()`s it after (LinuxVM does).

`attach_mmio` wraps the device in a virtio-mmio transport, registers it on `machine.mmio` at
`layout.VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE` with the interrupt line
`machine.edge_irq_line(irq)`, and gives the kernel argument that tells Linux it is there
(CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES): `virtio_mmio.device=4K@0xd0000000:5`. Linux has no other way to find a virtio-mmio device on x86
(there is no bus to enumerate; ARM machines describe them in the device tree instead).

Interrupts: ISA IRQs 0-15, which reach both the 8259 PICs and the IOAPIC's first pins, so the same
number works whichever the guest drives. Device `index` gets the index-th IRQ from
`layout.IRQ_VIRTIO_FIRST` up that no legacy PC device (nor the ACPI SCI, IRQ 9) uses: 5, 6, 7, 10,
11 (`VIRTIO_IRQS`). The line is edge-triggered at the PIC (ELCR is 0); that works because
virtio-mmio drops the line when the driver acknowledges InterruptStatus and Linux's handler looks
at the used rings only after acknowledging, so every new batch of used buffers is a new edge.

A virtio-blk device on a machine with the C run loop (`Machine(fast_path=True)`, as LinuxVM has)
gets its common requests served in C on the vCPU's thread (blk_fast.py), whatever `ioeventfd` says
(one disk per machine, a plain image file, a machine with one vCPU), and after such a kick C's
polling thread looks for more requests for `blk_poll_us` (BLK_POLL_US) with the driver told not to
kick (blk_fast.py, csrc/virtio_blk_poll.h).

With `ioeventfd=True` and a machine that has a KVM `vm`, guest writes to QueueNotify are caught by
KVM itself (KVM_IOEVENTFD with the queue index as datamatch): the vCPU does not exit, an eventfd is
signalled, and a thread (`IoEventNotifier`) calls the device's notify under the device lock. Without
it, a kick is an MMIO exit handled on the vCPU thread, which is simpler and always works.

    transport = attach_pci(machine, pci_bus, VirtioBlk(DiskImage("disk.img"))).transport

`attach_pci` puts the device on a `PciBus` as a modern virtio-pci function (pci.py) instead: Linux
finds it by enumerating PCI, so there is no kernel argument. The bus assigns its BAR (as firmware
would) and writes the chosen ISA IRQ into its Interrupt Line register, which is where Linux
without ACPI or an MP table takes the IRQ from (drivers/pci/probe.c pci_read_irq; x86's
pirq_enable_irq keeps it when there is no PIRQ routing table; with ACPI the DSDT's _PRT says the
same). IRQs are handed out downwards from 11 (11, 10, 7, 6, 5), while virtio-mmio devices take
them upwards from 5, and each PCI device
gets its own: several IrqLines on one KVM GSI would overwrite each other's level rather than
wire-OR them. The IRQ is made level-triggered in the PIC's ELCR (see pci.py). Kicks stay MMIO
exits: the BAR, and so the notify addresses, can move whenever the guest reprograms it, and an
ioeventfd would have to follow it.
"""

from __future__ import annotations

import os
import select
from dataclasses import dataclass

from pykvm.workers import start_worker
from pykvm.x86 import layout

from .blk import VirtioBlk
from .device import STATUS_DRIVER_OK, VirtioDevice
from .mmio import QUEUE_NOTIFY, VirtioMmio
from .pci import VirtioPci

# ISA IRQs that the PC's own devices use (or the PIC cascade, the FPU, the PS/2 mouse, the ACPI
# SCI: a level-triggered line the guest's ACPI driver owns).
_LEGACY_IRQS = frozenset({layout.IRQ_PIT, layout.IRQ_KEYBOARD, layout.IRQ_CASCADE,
                          layout.IRQ_COM2, layout.IRQ_COM1, layout.IRQ_RTC, layout.IRQ_SCI,
                          layout.IRQ_MOUSE, layout.IRQ_FPU, layout.IRQ_ATA0, layout.IRQ_ATA1})
VIRTIO_IRQS = tuple(i for i in range(layout.IRQ_VIRTIO_FIRST, 16) if i not in _LEGACY_IRQS)


# The C path's polling window (csrc/virtio_blk_poll.h), microseconds after the last batch: vhost's
# busy-poll suggestion; a guest streaming I/O makes its next batch available well within it.
BLK_POLL_US = 50


def virtio_mmio_irq(index: int) -> int:
    if not 0 <= index < len(VIRTIO_IRQS):
        raise ValueError(f"virtio-mmio device index {index}: only {len(VIRTIO_IRQS)} free ISA "
                         f"IRQs ({', '.join(map(str, VIRTIO_IRQS))})")
    return VIRTIO_IRQS[index]


@dataclass
class VirtioAttachment:
    """A virtio device as it sits on a machine."""

    device: VirtioDevice
    transport: VirtioMmio | VirtioPci
    irq: int
    kernel_arg: str | None = None            # virtio-mmio: how Linux learns of it
    notifier: "IoEventNotifier | None" = None  # virtio-mmio with ioeventfd

    def start(self) -> None:
        self.device.start()

    def close(self) -> None:
        """Stop the notifier thread (no more kicks reach the device), then close the device."""
        if self.notifier is not None:
            self.notifier.close()
            self.notifier = None
        self.device.close()


def attach_mmio(machine, device: VirtioDevice, index: int, *,
                ioeventfd: bool = False, blk_poll_us: int | None = None) -> VirtioAttachment:
    """Put `device` on `machine` as virtio-mmio device number `index`. blk_poll_us: how long the
    C path's polling thread looks for more requests after a batch (a virtio-blk disk served in C;
    default BLK_POLL_US, 0 for none)."""
    base = layout.VIRTIO_MMIO_BASE + index * layout.VIRTIO_MMIO_SIZE
    irq = virtio_mmio_irq(index)
    # Edge-triggered at the PIC/IOAPIC (see above): KVM_IRQFD where the machine offers it.
    transport = VirtioMmio(device, machine.mem, machine.edge_irq_line(irq))
    machine.mmio.register(base, layout.VIRTIO_MMIO_SIZE, transport, f"{device.name}#{index}")
    # A stand-in machine in a test may have no worker_failed: failures are then logged.
    device.on_worker_error = getattr(machine, "worker_failed", None)
    notifier = None
    if (isinstance(device, VirtioBlk) and getattr(machine, "fast", None) is not None
            and machine.fast.virtio_blk is None and not getattr(device.disk, "snapshot", True)
            and len(getattr(machine, "vcpus", ())) <= 1):
        # The C run loop serves its common requests (blk_fast.py), on the vCPU's thread the
        # moment the kick's exit arrives: on the 2-core KVM-PVM hosts this beats a kick handed
        # to an ioeventfd thread, so it wins over `ioeventfd` for the one disk it can take.
        # One vCPU only: the C loop runs on vCPU 0 and takes no lock, so a kick from another
        # vCPU served by the Python model at the same moment would race it on the queue.
        from pykvm.kvm.vblk import VblkStruct
        from .blk_fast import BlkFastPath
        from pykvm.kvm import KICK_SIGNAL
        from pykvm.machine import kick_handler_installed
        vblk = VblkStruct(machine.mem, base, layout.VIRTIO_MMIO_SIZE)
        poll = BLK_POLL_US if blk_poll_us is None else blk_poll_us
        # The poller kicks the vCPU when Python must take over: only where that signal is safe.
        if not kick_handler_installed():
            poll = 0
        machine.fast.bind_virtio_blk(BlkFastPath(transport, vblk, poll_us=poll,
                                                 kick_signal=KICK_SIGNAL))
    elif ioeventfd:
        notifier = IoEventNotifier(machine.vm, transport, base, on_error=device.on_worker_error)
    return VirtioAttachment(device, transport, irq, f"virtio_mmio.device=4K@{base:#x}:{irq}",
                            notifier)


# PCI INTx IRQs, from the top down (virtio-mmio takes VIRTIO_IRQS from the bottom up).
PCI_IRQS = tuple(reversed(VIRTIO_IRQS))


def _pci_irq(pci_bus) -> int:
    used = {d.config[0x3C] for d in pci_bus.devices() if d.config[0x3D]}
    for irq in PCI_IRQS:
        if irq not in used:
            return irq
    raise ValueError(f"no free IRQ left for a PCI device ({', '.join(map(str, PCI_IRQS))} "
                     "are taken)")


def attach_pci(machine, pci_bus, device: VirtioDevice, *, irq: int | None = None,
               slot: int | None = None) -> VirtioAttachment:
    """Put `device` on `pci_bus` as a virtio-pci function. `irq`: the ISA IRQ its INTA# is routed
    to (default: the highest of PCI_IRQS no other PCI device on the bus uses). The IRQ is set
    level-triggered at the machine's PIC."""
    if irq is None:
        irq = _pci_irq(pci_bus)
    transport = VirtioPci(device, machine.mem)
    device.on_worker_error = getattr(machine, "worker_failed", None)
    pci_bus.add(transport, slot=slot, irq=irq, irq_line=machine.irq_line(irq))
    set_level_triggered(machine, irq)
    return VirtioAttachment(device, transport, irq)


def set_level_triggered(machine, irq: int) -> None:
    """Mark ISA IRQ `irq` level-triggered in the ELCR of whichever 8259 the machine has, as a PC
    BIOS does for the IRQs it routes PCI INTx# to (Linux without a PIRQ table never does)."""
    if machine.userirq is not None:
        machine.userirq.pic.set_level_triggered(irq)
    elif machine.irqchip == "kernel":
        machine.vm.set_level_triggered(irq)


class IoEventNotifier:
    """One eventfd per queue, registered with KVM for writes of that queue's index to QueueNotify,
    and a thread that turns their signals into `device.notify(i)`."""

    def __init__(self, vm, transport: VirtioMmio, base: int, on_error=None):
        """on_error(thread name, exception): called if serving a kick raises (pykvm/workers.py);
        the thread then ends, and the handler (Machine.worker_failed) stops the VM."""
        self.vm = vm
        self.transport = transport
        self.addr = base + QUEUE_NOTIFY
        self.fds: list[int] = []
        try:
            for i in range(len(transport.device.queues)):
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.fds.append(fd)
                vm.ioeventfd(fd, self.addr, 4, datamatch=i)
        except BaseException:
            self._release()
            raise
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.kicks = 0
        self._thread = start_worker("pykvm-virtio-ioeventfd", self._loop, on_error)

    def _loop(self) -> None:
        index = {fd: i for i, fd in enumerate(self.fds)}
        watch = self.fds + [self._stop_r]
        while True:
            ready, _, _ = select.select(watch, [], [])
            if self._stop_r in ready:
                return
            for fd in ready:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                self.kicks += 1
                t = self.transport
                with t.device.lock:
                    if t.status & STATUS_DRIVER_OK:
                        t.device.notify(index[fd])

    def _release(self) -> None:
        for i, fd in enumerate(self.fds):
            try:
                self.vm.ioeventfd(fd, self.addr, 4, datamatch=i, deassign=True)
            except OSError:
                pass  # the VM is already gone
            os.close(fd)
        self.fds = []

    def close(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join()
            self._thread = None
            os.close(self._stop_r)
            os.close(self._stop_w)
        self._release()
