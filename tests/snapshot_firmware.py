"""The firmware side of tests/test_snapshot.py: a `checksum` firmware machine that can be saved
part-way and restored in another process (`python tests/snapshot_firmware.py restore FILE`)."""

from __future__ import annotations

import sys

from pykvm.devices.debugcon import DebugCon, ExitPort
from pykvm.machine import Machine, Stop
from pykvm.snapshot import Snapshot
from pykvm.snapshot.devices import machine_devices
from pykvm.testing.firmware import PORT_ASSIST, ModeSwitchAssist, assist_long_mode, build, prepare
from pykvm.x86 import layout

MEMORY = 16 << 20


def build_machine(out: bytearray, ram=None, on_output=None) -> Machine:
    m = Machine(MEMORY, irqchip="none", ram=ram)

    def write(data: bytes) -> None:
        out.extend(data)
        if on_output is not None:
            on_output(out)
    m.add_pio(layout.PORT_DEBUG, 1, DebugCon(write), "debugcon")
    m.add_pio(layout.PORT_EXIT, 4, ExitPort(lambda s: m.request_stop(Stop("exit", s))), "exit")
    return m


def boot(args, on_output=None) -> tuple[Machine, bytearray]:
    """A machine about to run `checksum` with `args`; on_output(all output so far) after each write."""
    out = bytearray()
    m = build_machine(out, on_output=on_output)
    prepare(m, build("checksum"), args=args)
    return m, out


def restore(path: str) -> tuple[Machine, bytearray]:
    out = bytearray()
    with Snapshot(path) as snap:
        m = build_machine(out, ram=snap.ram_backend)
        # What prepare() added besides RAM contents: the stateless mode-switch assist port.
        m.add_pio(PORT_ASSIST, 4, ModeSwitchAssist(lambda: assist_long_mode(m.vcpu)), "fw-assist")
        snap.apply(m, machine_devices(m))
    return m, out


if __name__ == "__main__":
    m, out = restore(sys.argv[2])
    stop = m.run(timeout=60)
    sys.stdout.write(out.decode())
    print(f"STOP {stop.reason} {stop.status}")
