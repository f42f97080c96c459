"""What the way to a VM's first instruction imports (issue 16: start-up <= 1.6x `python -c pass`).

bench/startup.py times spawn-to-first-guest-byte; these tests keep the reason it is fast from
quietly going away: the modules a firmware run needs must not pull in the heavy stdlib ones that
pykvm/record.py explains (dataclasses and its inspect/ast/dis, typing, logging, ctypes, and the
firmware builder's subprocess/tempfile/hashlib). They count modules, not time, so load cannot
make them flaky."""

import json
import subprocess
import sys

import pytest

from pykvm.record import FrozenRecord, Record

HEAVY = ("dataclasses", "inspect", "typing", "logging", "ctypes", "subprocess", "tempfile",
         "hashlib", "json", "ast")

# The start-up child's imports (bench/startup.py, _STARTUP_CHILD) and what it touches on the way.
PROBE = """
import json, sys
from pykvm.devices.debugcon import DebugCon
from pykvm.testing import firmware as F
import pykvm.machine, pykvm.elf, pykvm.x86.cpu
print(json.dumps(sorted(sys.modules)))
"""


def test_the_startup_path_imports_none_of_the_heavy_modules():
    # json is imported by the probe itself to report, after the fact: check the rest before it.
    probe = PROBE.replace("import json, sys\n", "import sys\n").replace(
        "print(json.dumps(sorted(sys.modules)))", "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.split()
    assert "pykvm.machine" in out          # the probe did import the path
    assert [m for m in HEAVY if m in out] == []


class Point(Record):
    __slots__ = ("x", "y")

    def __init__(self, x, y):
        self.x, self.y = x, y


class FrozenPoint(FrozenRecord):
    __slots__ = ("x", "y")

    def __init__(self, x, y):
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)


class OtherPoint(Record):
    __slots__ = ("x", "y")

    def __init__(self, x, y):
        self.x, self.y = x, y


def test_record_repr_and_equality_by_field():
    assert repr(Point(1, "a")) == "Point(x=1, y='a')"
    assert Point(1, 2) == Point(1, 2)
    assert Point(1, 2) != Point(1, 3)
    assert Point(1, 2) != OtherPoint(1, 2)       # another class is never equal, as dataclasses
    with pytest.raises(TypeError):
        hash(Point(1, 2))                        # mutable: unhashable, as eq=True dataclasses
    p = Point(1, 2)
    p.x = 5
    assert p == Point(5, 2)


class Point3(Point):
    __slots__ = ("z",)

    def __init__(self, x, y, z):
        super().__init__(x, y)
        self.z = z


class Where(Point):
    __slots__ = ()


def test_record_fields_include_the_base_classes():
    """A subclass lists only its own slots; repr and equality see the base's too (IoOut, IoIn)."""
    assert repr(Point3(1, 2, 3)) == "Point3(x=1, y=2, z=3)"
    assert Point3(1, 2, 3) != Point3(9, 2, 3)            # a base class's field counts
    assert repr(Where(1, 2)) == "Where(x=1, y=2)" and Where(1, 2) == Where(1, 2)
    assert Where(1, 2) != Point(1, 2)


def test_frozen_record_refuses_assignment_and_hashes_by_value():
    p = FrozenPoint(1, 2)
    with pytest.raises(AttributeError):
        p.x = 3
    with pytest.raises(AttributeError):
        del p.y
    assert p.x == 1
    assert hash(p) == hash(FrozenPoint(1, 2))
    assert {FrozenPoint(1, 2), FrozenPoint(1, 2), FrozenPoint(2, 1)} == {FrozenPoint(1, 2),
                                                                        FrozenPoint(2, 1)}


def test_exits_and_stop_keep_their_dataclass_behaviour():
    from pykvm.kvm import exits as E
    from pykvm.stop import Stop, StopReason
    # A dataclass's repr, but addresses in hex and the bytes of KVM's data window, not a memoryview
    assert repr(E.MmioWrite(0x10, memoryview(b"x"))) == "MmioWrite(addr=0x10, data=b'x')"
    assert repr(E.IoOut(0xe9, 1, 1, memoryview(bytearray(b"5")))) == \
        "IoOut(port=0xe9, size=1, count=1, data=b'5')"
    assert E.Debug(1, 0x1000) == E.Debug(1, 0x1000, 0, 0)
    assert E.Hlt() == E.Hlt() and E.Hlt() != E.Shutdown()
    s = Stop("until", message="matched")
    assert s.reason is StopReason.UNTIL and s.status is None
    assert s == Stop(StopReason.UNTIL, None, "matched")
    assert hash(s) == hash(Stop("until", None, "matched"))
    with pytest.raises(ValueError):
        Stop("untill")
    with pytest.raises(AttributeError):
        s.status = 1
    assert json.loads(json.dumps(str(s.reason))) == "until"
