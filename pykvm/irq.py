"""Interrupt lines: how a device tells "somebody" that it wants attention.

A device model owns one `IrqLine` per interrupt pin and drives it to a *level* (asserted or not)
that it recomputes from its own register state after every access (see Serial16550._update_irq).
Edge-triggered ISA devices are modelled the same way: the PIC (in-kernel or ours) latches the
rising edge.

Implementations:
- `KvmIrqLine` (here): KVM_IRQ_LINE on the in-kernel irqchip, through the `Vm` it is given;
- `IrqfdLine` (here): an eventfd KVM turns into an edge on the in-kernel irqchip, from any thread;
- the Python i8259's input pins (pykvm/devices/i8259.py);
- `RecordingIrqLine`, `NullIrqLine` (here): for unit tests, and a pin wired to nothing.

The two KVM lines are handed a `Vm` (pykvm.kvm.vm) and call its methods; this module imports no KVM
code, so a device sees only the `IrqLine` interface. `Machine.irq_line(gsi)` picks the right one.

A line only forwards *changes*, so devices may call `set_level` freely.
"""

from __future__ import annotations

import os


class IrqLine:
    """One interrupt line. Subclasses implement `_raise_level(level)`."""

    def __init__(self) -> None:
        self.level = False

    def set_level(self, level: bool) -> None:
        level = bool(level)
        if level != self.level:
            self.level = level
            self._raise_level(level)

    def pulse(self) -> None:
        """An edge: up then down (what an edge-triggered ISA device does once per event)."""
        self.set_level(True)
        self.set_level(False)

    def _raise_level(self, level: bool) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class RecordingIrqLine(IrqLine):
    """Records the sequence of level changes; `edges` counts rising edges."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[bool] = []

    def _raise_level(self, level: bool) -> None:
        self.history.append(level)

    @property
    def edges(self) -> int:
        return sum(1 for lv in self.history if lv)


class NullIrqLine(IrqLine):
    """A pin wired to nothing."""

    def _raise_level(self, level: bool) -> None:
        pass


class KvmIrqLine(IrqLine):
    """An input pin of KVM's in-kernel interrupt controllers (KVM_IRQ_LINE on the VM fd)."""

    def __init__(self, vm, gsi: int):
        super().__init__()
        self.vm = vm
        self.gsi = gsi

    def _raise_level(self, level: bool) -> None:
        self.vm.irq_line(self.gsi, level)


class IrqfdLine(IrqLine):
    """An edge-triggered GSI raised through KVM_IRQFD: a rising edge writes an eventfd and KVM itself
    pulses the in-kernel PIC/IOAPIC input (assert, deassert), with no ioctl on the VM fd and from
    whichever thread raised it (the virtio ioeventfd worker, the net receive thread). For the ISA
    edge-triggered lines virtio-mmio devices use; level-triggered lines (PCI INTx) stay KvmIrqLine,
    which holds the level until the device lowers it. Whoever made it closes `fd` after the VM."""

    def __init__(self, vm, gsi: int):
        super().__init__()
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vm.irqfd(self.fd, gsi)
        self.pulses = 0

    def _raise_level(self, level: bool) -> None:
        if level:
            os.eventfd_write(self.fd, 1)
            self.pulses += 1
