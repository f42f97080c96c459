"""Small value classes written out by hand: what `dataclasses` would generate, without its cost.

The types every VM needs before its first instruction (the typed exits, `Stop`, a bus `Range`, a RAM
`Region`) were dataclasses. Importing `dataclasses` pulls in `inspect` (and with it `dis`, `ast`,
`tokenize`, `linecache`), and each `@dataclass` then builds its methods by `exec`ing generated source:
measured with callgrind on Debian's Python 3.11, `import dataclasses` alone is ~34 M instructions,
half of what a whole `python -c pass` executes (70 M), and the thirteen exit classes another ~16 M.
That was most of the start-up cost that issue 16 asks to cut (bench/startup.py, row 5).

So these classes declare their fields as `__slots__` and write their `__init__` themselves, and
`Record` gives them what a dataclass also has: a `repr` naming the fields, and equality field by
field between objects of the same class. `FrozenRecord` adds what `frozen=True` gave: assignment
raises, and instances hash by their fields. Dataclasses elsewhere (configuration, snapshots), which
are not on the way to the first guest instruction, stay dataclasses.
"""

from __future__ import annotations


class Record:
    """A value whose fields are the `__slots__` of its class and of the classes it derives from
    (each class lists only its own; `_fields` is all of them, base classes' first)."""

    __slots__ = ()
    __hash__ = None     # mutable and compared by value, as an (eq=True, frozen=False) dataclass
    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._fields = tuple(name for klass in reversed(cls.__mro__)
                            for name in klass.__dict__.get("__slots__", ()))

    def _values(self) -> tuple:
        return tuple(getattr(self, k) for k in self._fields)

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}(" + ", ".join(
            f"{k}={getattr(self, k)!r}" for k in self._fields) + ")"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()


class FrozenRecord(Record):
    """A Record whose fields cannot be assigned after `__init__` (which sets them with
    `object.__setattr__`), and which hashes by its fields."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")

    def __hash__(self) -> int:
        return hash(self._values())
