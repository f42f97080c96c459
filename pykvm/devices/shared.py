"""Device registers that may move into memory shared with pykvm's C run loop.

A device lists such registers in `SHARED`: (attribute, field of the C struct). Normally they are plain
instance attributes, as fast as any. `share_registers(block)` moves their values into a cffi struct
(csrc/fastpath.h) and switches the instance to a subclass whose attributes of those names read and
write that struct: one copy of each register, seen by both the model and the C loop, and the
device's code unchanged. (The subclass costs a Python call per access, which is why a device that
is not shared does not pay it.)
"""

from __future__ import annotations

from functools import lru_cache


class SharedRegister:
    """A data descriptor forwarding to `obj.shared.<field>`."""

    def __init__(self, field: str):
        self.field = field

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return getattr(obj.shared, self.field)

    def __set__(self, obj, value) -> None:
        setattr(obj.shared, self.field, value)


@lru_cache(maxsize=None)
def _shared_class(cls: type) -> type:
    attrs = {attr: SharedRegister(field) for attr, field in cls.SHARED}
    return type(cls.__name__, (cls,), {**attrs, "__doc__": cls.__doc__,
                                       "__module__": cls.__module__})


class SharesRegisters:
    """Mixin for devices with registers the C run loop can read (see the module docstring)."""

    SHARED: tuple[tuple[str, str], ...] = ()

    def share_registers(self, block) -> None:
        """Keep the SHARED registers in `block` (a cffi struct) from now on."""
        for attr, field in self.SHARED:
            setattr(block, field, self.__dict__.pop(attr))
        self.shared = block
        self.__class__ = _shared_class(type(self))


@lru_cache(maxsize=None)
def _attribute_class(cls: type, pairs: tuple[tuple[str, str], ...]) -> type:
    attrs = {attr: SharedRegister(field) for attr, field in pairs}
    return type(cls.__name__, (cls,), {**attrs, "__doc__": cls.__doc__,
                                       "__module__": cls.__module__})


def share_attributes(obj, block, pairs) -> None:
    """`share_registers` for an object that does not list its shared attributes itself (a virtio
    queue's indices, a transport's InterruptStatus, an interrupt line's level, which the C
    virtio-blk path keeps in its own struct): `obj.<attr>` lives in `block.<field>` from now on,
    for each (attr, field) in `pairs`. `block` must own its memory (an ffi.new result), so that
    it lives as long as `obj` does."""
    pairs = tuple(pairs)
    for attr, field in pairs:
        setattr(block, field, obj.__dict__.pop(attr))
    obj.shared = block
    obj.__class__ = _attribute_class(type(obj), pairs)
