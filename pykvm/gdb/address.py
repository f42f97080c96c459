"""Where the gdb stub listens: `--gdb tcp::1234` as QEMU spells it, and the one error type for a
--gdb setting that cannot be used."""

from __future__ import annotations


class GdbError(Exception):
    """A --gdb setting that cannot be used (bad address, busy port); one line."""


def parse_address(text: str) -> tuple[str, int]:
    """QEMU's `tcp::1234` / `tcp:HOST:1234` / `tcp:[IPV6]:1234`, or `HOST:PORT`, `:PORT`, `PORT`. An empty host is
    127.0.0.1: the stub gives full control of the guest, so it listens on loopback unless told."""
    spec = text[4:] if text.startswith("tcp:") else text
    host, _, port = spec.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]                 # an IPv6 address, as QEMU writes it: tcp:[::1]:1234
    try:
        number = int(port)
    except ValueError:
        raise GdbError(f"--gdb {text!r}: expected tcp::PORT or tcp:HOST:PORT (e.g. tcp::1234)") from None
    if not 0 < number < 65536:
        raise GdbError(f"--gdb {text!r}: port {number} is not a TCP port (1-65535)")
    return host or "127.0.0.1", number
