"""Device state for snapshots: one protocol for every device model.

A device that a snapshot must keep lists the attributes that *are* its state in `STATE`, and
inherits `save_state()` / `restore_state()` from `Stateful`:

    class Serial16550(ByteRegisters, Stateful):
        STATE = ("ier", "lcr", ..., "rx", "irq")

`save_state()` returns a plain dict {name: value} of ints, bools, None, floats, strings, bytes,
lists, tuples and dicts (pykvm/snapshot/codec.py writes exactly these), converting as it goes:

    bytearray -> bytes          deque -> list               IrqLine -> its level (bool)
    a Stateful attribute (a queue, a channel, a drive) -> its own save_state() dict
    a list or tuple of Stateful -> a list of their dicts

`restore_state(state)` puts the values back into the *existing* object, using the attribute's
current value as the template: a bytearray stays a bytearray, a deque a deque, a nested Stateful is
restored in place (same length for lists of them), and an IrqLine gets its level back *silently*.
Silently matters: the interrupt controller's own state is restored too (KVM_SET_IRQCHIP, or the
Python 8259's `pins`), and a line re-driven from low to high would deliver the edge a second time.
After that, `after_restore()` (a hook, empty by default) lets a device recompute what is derived
from its state (cached ring locations, a timer deadline).

What stays out of STATE: wiring made by whoever built the device (irq line *objects*, callbacks,
guest memory, backends such as a disk image - those are reattached by the restoring VMM, which
builds the same machine), and statistics that have no effect on what the guest sees may go either
way (most devices keep their counters, so a restored VM's stats continue).

Devices know nothing of snapshots files or KVM; this module imports neither.
"""

from __future__ import annotations

from collections import deque

from pykvm.irq import IrqLine


class StateError(ValueError):
    """Saved device state does not fit the device it is restored into (a one-line message)."""


class Stateful:
    STATE: tuple[str, ...] = ()

    def save_state(self) -> dict:
        return {name: _encode(getattr(self, name)) for name in self.STATE}

    def restore_state(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise StateError(f"{type(self).__name__}: saved state is not a dict")
        missing = [n for n in self.STATE if n not in state]
        if missing:
            raise StateError(f"{type(self).__name__}: saved state lacks {', '.join(missing)}")
        for name in self.STATE:
            current = getattr(self, name)
            value = _decode(current, state[name], f"{type(self).__name__}.{name}")
            if value is not current:        # restored in place (a nested device): nothing to set
                setattr(self, name, value)
        self.after_restore()

    def after_restore(self) -> None:
        """Recompute derived state after restore_state(); devices override as needed."""


def _encode(value):
    if isinstance(value, Stateful):
        return value.save_state()
    if isinstance(value, IrqLine):
        return value.level
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (list, deque)):
        return [_encode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_encode(v) for v in value)
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save a {type(value).__name__} as device state")


def _decode(current, saved, where: str):
    if isinstance(current, Stateful):
        current.restore_state(saved)
        return current
    if isinstance(current, IrqLine):
        current.level = bool(saved)
        return current
    if isinstance(current, (list, tuple)) and current and isinstance(current[0], (Stateful, IrqLine)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(current):
            raise StateError(f"{where}: saved state does not have {len(current)} items")
        for i, (item, s) in enumerate(zip(current, saved)):
            _decode(item, s, f"{where}[{i}]")
        return current
    if isinstance(current, bytearray):
        _check(saved, bytes, where)
        return bytearray(saved)
    if isinstance(current, deque):
        _check(saved, (list, tuple), where)
        return deque(saved)
    if isinstance(current, list):
        _check(saved, (list, tuple), where)
        return list(saved)
    if isinstance(current, bool):
        _check(saved, (bool, int), where)
        return bool(saved)
    if isinstance(current, int) and not isinstance(saved, int):
        # An int attribute that may be None at times (a pending command) keeps None.
        if saved is not None:
            raise StateError(f"{where}: saved {type(saved).__name__}, expected an int")
    return saved


def _check(value, types, where: str) -> None:
    if not isinstance(value, types):
        raise StateError(f"{where}: saved {type(value).__name__} does not fit")
