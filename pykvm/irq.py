"""Interrupt lines: how a device tells "somebody" that it wants attention.

A device model owns one `IrqLine` per interrupt pin and drives it to a *level* (asserted or not)
that it recomputes from its own register state after every access (see Serial16550._update_irq).
Edge-triggered ISA devices are modelled the same way: the PIC (in-kernel or ours) latches the
rising edge.

Implementations:
- `KvmIrqLine`: KVM_IRQ_LINE on the in-kernel irqchip (pykvm/kvm/vm.py);
- the Python i8259's input pins (pykvm/devices/i8259.py);
- `RecordingIrqLine`: remembers every level change, for unit tests.

A line only forwards *changes*, so devices may call `set_level` freely.
"""

from __future__ import annotations

from typing import Callable


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


class CallbackIrqLine(IrqLine):
    """Calls `fn(level)` on every change: glue for wiring a line to anything."""

    def __init__(self, fn: Callable[[bool], None]):
        super().__init__()
        self._fn = fn

    def _raise_level(self, level: bool) -> None:
        self._fn(level)


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
