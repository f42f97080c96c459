"""A small self-describing encoding for saved device state (pykvm/devices/state.py).

Values are the plain ones device state is made of: None, bools, ints of any size, floats, str,
bytes, lists, tuples and dicts (keys of any of these scalar kinds). Each is a one-byte tag and its
payload, lengths as unsigned LEB128:

    N           None                    T / F       True / False
    I <n> <b>   int, n bytes, two's complement little-endian
    D <8>       float, IEEE 754 double, little-endian
    S <n> <b>   str, UTF-8              B <n> <b>   bytes
    L <n> ...   list of n values        U <n> ...   tuple of n values
    M <n> ...   dict of n key, value pairs

Unlike pickle, decoding builds nothing but these values (a snapshot file is input from anywhere),
and unlike JSON it keeps bytes, tuples and integer keys as they were. Malformed input raises
CodecError with a one-line message.
"""

from __future__ import annotations

import struct

_DOUBLE = struct.Struct("<d")
MAX_DEPTH = 64


class CodecError(ValueError):
    pass


def encode(value) -> bytes:
    out = bytearray()
    _enc(value, out, 0)
    return bytes(out)


def _uleb(n: int, out: bytearray) -> None:
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _enc(v, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CodecError("state nested too deeply")
    if v is None:
        out += b"N"
    elif v is True:
        out += b"T"
    elif v is False:
        out += b"F"
    elif isinstance(v, int):
        raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
        out += b"I"
        _uleb(len(raw), out)
        out += raw
    elif isinstance(v, float):
        out += b"D" + _DOUBLE.pack(v)
    elif isinstance(v, str):
        raw = v.encode()
        out += b"S"
        _uleb(len(raw), out)
        out += raw
    elif isinstance(v, (bytes, bytearray, memoryview)):
        out += b"B"
        _uleb(len(v), out)
        out += v
    elif isinstance(v, (list, tuple)):
        out += b"L" if isinstance(v, list) else b"U"
        _uleb(len(v), out)
        for item in v:
            _enc(item, out, depth + 1)
    elif isinstance(v, dict):
        out += b"M"
        _uleb(len(v), out)
        for key, item in v.items():
            _enc(key, out, depth + 1)
            _enc(item, out, depth + 1)
    else:
        raise CodecError(f"cannot encode a {type(v).__name__}")


def decode(data: bytes):
    value, end = _dec(memoryview(data), 0, 0)
    if end != len(data):
        raise CodecError(f"{len(data) - end} stray bytes after the encoded state")
    return value


def _read_uleb(b: memoryview, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(b):
            raise CodecError("encoded state ends inside a length")
        byte = b[i]
        i += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return n, i
        shift += 7
        if shift > 63:
            raise CodecError("length out of range in encoded state")


def _take(b: memoryview, i: int, n: int) -> tuple[memoryview, int]:
    if i + n > len(b):
        raise CodecError("encoded state is truncated")
    return b[i:i + n], i + n


def _dec(b: memoryview, i: int, depth: int):
    if depth > MAX_DEPTH:
        raise CodecError("encoded state nested too deeply")
    if i >= len(b):
        raise CodecError("encoded state is truncated")
    tag = b[i]
    i += 1
    if tag == 0x4E:      # N
        return None, i
    if tag == 0x54:      # T
        return True, i
    if tag == 0x46:      # F
        return False, i
    if tag == 0x44:      # D
        raw, i = _take(b, i, 8)
        return _DOUBLE.unpack(raw)[0], i
    if tag in b"ISB":
        n, i = _read_uleb(b, i)
        raw, i = _take(b, i, n)
        if tag == 0x49:
            return int.from_bytes(raw, "little", signed=True), i
        if tag == 0x53:
            try:
                return str(raw, "utf-8"), i
            except UnicodeDecodeError:
                raise CodecError("bad UTF-8 in encoded state") from None
        return bytes(raw), i
    if tag in b"LUM":
        n, i = _read_uleb(b, i)
        if n > len(b) - i:
            raise CodecError("encoded state is truncated")
        if tag == 0x4D:
            d = {}
            for _ in range(n):
                key, i = _dec(b, i, depth + 1)
                value, i = _dec(b, i, depth + 1)
                try:
                    d[key] = value
                except TypeError:
                    raise CodecError("unhashable key in encoded state") from None
            return d, i
        items = []
        for _ in range(n):
            item, i = _dec(b, i, depth + 1)
            items.append(item)
        return (items if tag == 0x4C else tuple(items)), i
    raise CodecError(f"unknown tag {tag:#04x} in encoded state")
