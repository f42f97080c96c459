"""Device registers that may live in memory shared with pykvm's C run loop.

A device declares such registers as class attributes, `ier = SharedRegister()`. By default their
values are kept in a plain namespace (`device.shared`), and the device reads and writes them like any
attribute. `share_registers(block)` moves them into a cffi struct (csrc/fastpath.h) that the C loop
reads directly: one copy of the register, two readers. The device code does not change.
"""

from __future__ import annotations

from types import SimpleNamespace


class SharedRegister:
    """A data descriptor forwarding to `obj.shared.<field>` (field defaults to the attribute name)."""

    def __init__(self, field: str | None = None):
        self.field = field

    def __set_name__(self, owner, name: str) -> None:
        self.field = self.field or name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return getattr(obj.shared, self.field)

    def __set__(self, obj, value) -> None:
        setattr(obj.shared, self.field, value)


class SharesRegisters:
    """Mixin: `shared` starts as a namespace; `share_registers` moves the values to a C block."""

    def _init_shared(self) -> None:
        self.shared = SimpleNamespace()

    def _shared_fields(self) -> list[str]:
        return [d.field for d in vars(type(self)).values() if isinstance(d, SharedRegister)]

    def share_registers(self, block) -> None:
        """Keep the shared registers in `block` (a cffi struct with the same field names) from now on."""
        for field in self._shared_fields():
            setattr(block, field, getattr(self.shared, field))
        self.shared = block
