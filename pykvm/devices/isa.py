"""What the legacy PC devices share: byte-wide registers on the ISA bus.

The UART, the 8254, the 8042 and the CMOS/RTC decode 8-bit accesses only. When a guest does a 16- or
32-bit `in`/`out` to them, the ISA bus splits it into byte cycles at consecutive ports, low byte
first (so `outw %ax, $0x70` writes the CMOS index from AL and then the data from AH). `ByteRegisters`
does that split once for all of them; a device implements `_read_byte(offset)` and
`_write_byte(offset, value)`.
"""

from __future__ import annotations


class ByteRegisters:
    def _read_byte(self, offset: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _write_byte(self, offset: int, value: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, offset: int, size: int) -> int:
        if size == 1:
            return self._read_byte(offset)
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 1:
            self._write_byte(offset, value & 0xFF)
            return
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)
