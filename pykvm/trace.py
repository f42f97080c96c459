"""An exit tracer: watch, one line per exit, what the guest asks of the VMM.

    with Machine(...) as m:
        m.trace = ExitTracer(m)        # or: pykvm boot ... --trace FILE
        m.run()

Each line shows the exit, decoded: the port or address, the size, the data, and which device the
bus will hand it to. It is the quickest way to see how a guest drives its hardware - the 8250
driver's probe of the UART, a virtio driver's initialisation, a firmware's port writes.
"""

from __future__ import annotations

import sys
from typing import TextIO

from .kvm import exits as E
from .stop import Stop, StopReason


class ExitTracer:
    def __init__(self, machine, out: TextIO | None = None, limit: int | None = None):
        self.machine = machine
        self.out = out or sys.stderr
        self.limit = limit
        self.count = 0

    def _device(self, bus, addr: int) -> str:
        r = bus.find(addr)
        return f"{r.name}+{addr - r.base:#x}" if r else "unclaimed"

    def describe(self, exit: E.Exit) -> str:
        m = self.machine
        if isinstance(exit, E.IoOut):
            value = bytes(exit.data).hex()
            rep = f" x{exit.count}" if exit.count > 1 else ""
            return f"out  port {exit.port:#06x} size {exit.size}{rep} data {value}  -> {self._device(m.pio, exit.port)}"
        if isinstance(exit, E.IoIn):
            rep = f" x{exit.count}" if exit.count > 1 else ""
            return f"in   port {exit.port:#06x} size {exit.size}{rep}  -> {self._device(m.pio, exit.port)}"
        if isinstance(exit, E.MmioWrite):
            return (f"mmio write {exit.addr:#x} size {len(exit.data)} data {bytes(exit.data).hex()}"
                    f"  -> {self._device(m.mmio, exit.addr)}")
        if isinstance(exit, E.MmioRead):
            return f"mmio read  {exit.addr:#x} size {len(exit.data)}  -> {self._device(m.mmio, exit.addr)}"
        return repr(exit)

    def __call__(self, exit: E.Exit) -> None:
        # Called on the thread of the vCPU that exited (Machine.vcpu names it); with several
        # vCPUs, each line says which one.
        self.count += 1
        if self.limit is None or self.count <= self.limit:
            vcpus = getattr(self.machine, "vcpus", ())
            who = f" cpu{self.machine.vcpu.index}" if len(vcpus) > 1 else ""
            try:
                print(f"[exit {self.count}{who}] {self.describe(exit)}", file=self.out)
            except OSError as e:        # a full disk (ENOSPC), a closed pipe: stop, saying why
                self.limit = 0
                why = f"cannot write the exit trace: {e.strerror or e}"
                self.machine.request_stop(Stop(StopReason.ERROR, message=why))
