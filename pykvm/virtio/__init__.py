"""Virtio: paravirtual devices a guest drives through shared-memory queues (OASIS VIRTIO 1.2).

How a virtio device comes to life in a pykvm guest:

1. The VMM builds a device model - `VirtioBlk(DiskImage(path))`, `VirtioNet(Tap())`,
   `VirtioConsole(output)`, `VirtioRng()` - each a `VirtioDevice` (device.py): a type id, feature
   bits, a configuration space, a few virtqueues, and a handler for queue notifications. It knows
   nothing of KVM or of how the guest reaches it.
2. A *transport* makes it reachable. `attach_mmio(machine, device, index)` (attach.py) wraps it in
   `VirtioMmio` (mmio.py), a page of registers on the machine's MMIO bus, wires an interrupt line,
   and returns a `VirtioAttachment` that holds the kernel argument
   `virtio_mmio.device=4K@0xd0000000:5` telling Linux where it is; the VMM keeps the attachment and
   closes it. (`attach_pci` puts it on the PCI bus instead, where Linux finds it by scanning.)
3. Linux's virtio_mmio driver probes the page (magic "virt", version 2), resets the device, sets
   ACKNOWLEDGE and DRIVER, reads the offered features, writes the subset it accepts, sets
   FEATURES_OK and checks it stuck, lays out each queue in its RAM (descriptor table, available
   ring, used ring) and writes their addresses, then sets DRIVER_OK. The transport checks every
   step; a step out of order is counted and may set DEVICE_NEEDS_RESET.
4. The driver puts buffers in a queue and writes the queue's index to QueueNotify: a VM exit the
   machine turns into `transport.write(0x50, 4, index)` (or, with ioeventfd, a signal KVM sends
   without exiting). The device walks the descriptor chains through `GuestMemory` (queue.py),
   bounds-checking every index and address, does the work, and puts the chains in the used ring.
5. The transport sets InterruptStatus and raises the line; the guest's handler reads and
   acknowledges it and collects the used buffers.

`mock.py` is the driver's side of all this, for tests with no guest.
"""

from .attach import VirtioAttachment, attach_mmio, attach_pci
from .blk import VirtioBlk
from .console import VirtioConsole
from .device import VirtioDevice
from .mmio import VirtioMmio
from .pci import VirtioPci
from .net import VirtioNet
from .queue import ChainError, DescChain, VirtQueue
from .rng import VirtioRng

__all__ = ["VirtioAttachment", "attach_mmio", "attach_pci", "VirtioPci", "ChainError", "DescChain", "VirtioBlk", "VirtioConsole", "VirtioDevice",
           "VirtioMmio", "VirtioNet", "VirtioRng", "VirtQueue"]
