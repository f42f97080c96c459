"""A tiny encoder for ACPI Machine Language (AML), the byte code in the DSDT.

A firmware author writes ASL (`Device (COM1) { Name (_HID, EisaId ("PNP0501")) }`) and a compiler
(`iasl`) turns it into AML; the OS's interpreter (ACPICA, in Linux) walks the AML to build its
namespace. pykvm's DSDT is small and fixed in shape, so instead of shipping a compiler we build the
AML with the handful of term encodings below, each one a function returning bytes. The grammar is
ACPI 6.5, chapter 20 ("ACPI Machine Language Specification"); section numbers are given beside each
encoding. The tests disassemble the result with Debian's `iasl -d`, an independent reader.

Only what pykvm's DSDT needs is here: names, integers, strings, packages, buffers, Scope, Device,
the resource descriptors of _CRS (chapter 6.4), and just enough of methods for the VM generation
ID device: Method, Return, Notify. No operation regions.
"""

from __future__ import annotations

# Opcodes (20.3, "AML Byte Stream Byte Values")
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
METHOD_OP = 0x14
NOTIFY_OP = 0x86
RETURN_OP = 0xA4
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82               # after EXT_OP_PREFIX: DeviceOp is 5B 82
ONES_OP = 0xFF
ROOT_CHAR = 0x5C               # '\'
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F


def pkg_length(body_len: int) -> bytes:
    """PkgLength (20.2.4): the length of the package *including the PkgLength bytes themselves*.

    One byte holds lengths up to 63 (bits 0-5). Longer ones use 1-3 extra bytes: the lead byte's
    bits 6-7 give the count of following bytes, its bits 0-3 the low nibble of the length, and each
    following byte the next 8 bits."""
    for extra in range(4):
        total = body_len + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < (1 << (4 + 8 * extra)):
            out = [(extra << 6) | (total & 0x0F)]
            rest = total >> 4
            for _ in range(extra):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise ValueError(f"AML package of {body_len} bytes is longer than PkgLength can say (256 MiB)")


def name_seg(seg: str) -> bytes:
    """NameSeg (20.2.2): four characters, a leading letter or '_', padded with '_'."""
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_"):
        raise ValueError(f"bad ACPI name segment {seg!r}")
    if not all(c.isupper() or c.isdigit() or c == "_" for c in seg):
        raise ValueError(f"bad ACPI name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """NameString (20.2.2): `\\_SB.PCI0` -> root char, DualNamePrefix, two segments."""
    root = path.startswith("\\")
    segs = [s for s in path.lstrip("\\").split(".") if s]
    encoded = b"".join(name_seg(s) for s in segs)
    if len(segs) == 0:
        body = b"\x00"                      # NullName
    elif len(segs) == 1:
        body = encoded
    elif len(segs) == 2:
        body = bytes([DUAL_NAME_PREFIX]) + encoded
    else:
        body = bytes([MULTI_NAME_PREFIX, len(segs)]) + encoded
    return (bytes([ROOT_CHAR]) if root else b"") + body


def integer(value: int) -> bytes:
    """ComputationalData integer (20.2.3): Zero/One/Ones, or the smallest prefix that holds it."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"AML integer {value} out of range")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise AssertionError("unreachable")


def string(text: str) -> bytes:
    """String (20.2.3): StringPrefix, ASCII characters, a NUL."""
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\x00"


def eisa_id(text: str) -> bytes:
    """EisaId("PNP0501") as the 32-bit integer ASL's EisaId() macro makes (19.6.35): three
    letters of 5 bits each (A=1) and four hex digits, stored big-endian in a DWord."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"bad EISA id {text!r}")
    letters = [(ord(c) - 0x40) & 0x1F for c in text[:3]]
    product = int(text[3:], 16)
    value = (letters[0] << 26) | (letters[1] << 21) | (letters[2] << 16) | product
    return bytes([DWORD_PREFIX]) + value.to_bytes(4, "big")


def name(path: str, data: bytes) -> bytes:
    """DefName (20.2.5.1): Name (path, data)."""
    return bytes([NAME_OP]) + name_string(path) + data


def package(*elements: bytes) -> bytes:
    """DefPackage (20.2.5.4): PackageOp PkgLength NumElements PackageElementList."""
    if len(elements) > 255:
        raise ValueError("a Package holds at most 255 elements (use VarPackage)")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    """DefBuffer (20.2.5.4): BufferOp PkgLength BufferSize ByteList."""
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    """DefScope (20.2.5.1): Scope (path) { terms }."""
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    """DefDevice (20.2.5.2): Device (path) { terms }."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(path: str, *terms: bytes, args: int = 0, serialized: bool = False) -> bytes:
    """DefMethod (20.2.5.2): MethodOp PkgLength NameString MethodFlags TermList. MethodFlags:
    bits 0-2 the argument count, bit 3 SerializeFlag, bits 4-7 SyncLevel (0 here)."""
    if not 0 <= args <= 7:
        raise ValueError(f"an AML method takes 0-7 arguments, not {args}")
    body = name_string(path) + bytes([args | (0x08 if serialized else 0)]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


def return_(value: bytes) -> bytes:
    """DefReturn (20.2.5.3): ReturnOp ArgObject - an encoded TermArg (an integer, a package...)."""
    return bytes([RETURN_OP]) + value


def notify(path: str, value: int) -> bytes:
    """DefNotify (20.2.5.3): NotifyOp NotifyObject NotifyValue - tell the OS's driver of the
    device at `path` that event `value` happened (5.6.6: 0x80 and up are device-specific)."""
    return bytes([NOTIFY_OP]) + name_string(path) + integer(value)


# ---- resource descriptors for _CRS (6.4, "Resource Data Types for ACPI") ----

def io_port(base: int, length: int, alignment: int = 1) -> bytes:
    """I/O Port Descriptor (6.4.2.5, small item 0x08, 7 bytes): decodes 16 address bits, a fixed
    range (minimum = maximum = base)."""
    return bytes([0x47, 0x01]) + base.to_bytes(2, "little") * 2 + bytes([alignment, length])


def irq_no_flags(irq: int) -> bytes:
    """IRQ Descriptor without the flags byte (6.4.2.1, small item 0x04, length 2): an ISA IRQ,
    edge-triggered, active high, by definition."""
    if not 0 <= irq < 16:
        raise ValueError(f"ISA IRQ {irq} out of range")
    return bytes([0x22]) + (1 << irq).to_bytes(2, "little")


# Address Space Resource Descriptors (6.4.3.5): large items with a general-flags byte saying what
# the range is (resource type 0 memory, 1 I/O, 2 bus numbers) and whether the device produces it
# for its children (a bridge's window: ResourceProducer, general flags bit 0 clear).
_RANGE_MEMORY, _RANGE_IO, _RANGE_BUS = 0, 1, 2
_GENERAL_FLAGS = 0x0C          # MinFixed and MaxFixed set, positive decode, producer


def _address_space(tag: int, size: int, kind: int, type_flags: int, lo: int, hi: int) -> bytes:
    fields = [0, lo, hi, 0, hi - lo + 1]       # granularity, min, max, translation, length
    body = bytes([kind, _GENERAL_FLAGS, type_flags]) + b"".join(
        f.to_bytes(size, "little") for f in fields)
    return bytes([tag]) + len(body).to_bytes(2, "little") + body


def word_bus_numbers(lo: int, hi: int) -> bytes:
    """WordBusNumber (6.4.3.5.3, large item 0x88): the bus numbers behind a host bridge."""
    return _address_space(0x88, 2, _RANGE_BUS, 0, lo, hi)


def word_io(lo: int, hi: int) -> bytes:
    """WordIO (6.4.3.5.3, large item 0x88): an I/O port window. Type flags 3: ISA and non-ISA
    ranges both decoded."""
    return _address_space(0x88, 2, _RANGE_IO, 0x03, lo, hi)


def dword_memory(lo: int, hi: int) -> bytes:
    """DWordMemory (6.4.3.5.2, large item 0x87): a 32-bit memory window. Type flags 0x01:
    read-write, non-cacheable (device memory)."""
    return _address_space(0x87, 4, _RANGE_MEMORY, 0x01, lo, hi)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () { ... } (19.3.3): a Buffer of descriptors closed by an End Tag
    (6.4.2.9: 0x79, then a checksum byte; 0 means "treat as checksummed")."""
    return buffer(b"".join(descriptors) + bytes([0x79, 0x00]))
