"""The GDB remote serial protocol's framing (GDB manual, "Remote Protocol", E.1 "Overview").

Every packet travels as `$payload#cs`: cs is the sum of the payload's bytes modulo 256 in two hex
digits. The receiver answers `+` (good) or `-` (resend) unless both sides agreed on
QStartNoAckMode. In the payload, `#`, `$`, `}` and `*` are escaped as `}` followed by the byte
XOR 0x20 (binary data in X packets and qXfer replies). Outside any packet, a single byte 0x03 is
an interrupt: "stop the target now" (what Ctrl-C in gdb sends).

`PacketReader` turns the byte stream into a sequence of events: ("packet", payload bytes),
("interrupt", None), ("ack", "+"/"-"). It keeps partial input between feeds, so it does not care
how the socket splits the stream.
"""

from __future__ import annotations

INTERRUPT = 0x03
_ESCAPED = {ord("#"), ord("$"), ord("}"), ord("*")}


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def escape(payload: bytes) -> bytes:
    out = bytearray()
    for b in payload:
        if b in _ESCAPED:
            out += bytes((ord("}"), b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(payload: bytes) -> bytes:
    out = bytearray()
    it = iter(payload)
    for b in it:
        if b == ord("}"):
            out.append(next(it, 0) ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes | str) -> bytes:
    """`$payload#cs`, escaping what must be escaped."""
    if isinstance(payload, str):
        payload = payload.encode()
    body = escape(payload)
    return b"$" + body + b"#" + f"{checksum(body):02x}".encode()


class PacketReader:
    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, bytes | None]]:
        """Add received bytes; return the complete events they finish, in order. A packet whose
        checksum is wrong comes back as ("bad", payload): answer it with `-`."""
        self._buf += data
        events: list[tuple[str, bytes | None]] = []
        buf = self._buf
        while buf:
            b = buf[0]
            if b == INTERRUPT:
                events.append(("interrupt", None))
                del buf[0]
            elif b in (ord("+"), ord("-")):
                events.append(("ack", bytes((b,))))
                del buf[0]
            elif b == ord("$"):
                end = buf.find(b"#")
                if end < 0 or len(buf) < end + 3:
                    break                       # wait for the rest
                body = bytes(buf[1:end])
                try:
                    ok = int(buf[end + 1:end + 3], 16) == checksum(body)
                except ValueError:
                    ok = False
                del buf[:end + 3]
                events.append(("packet" if ok else "bad", unescape(body)))
            else:
                del buf[0]                      # noise between packets
        return events
