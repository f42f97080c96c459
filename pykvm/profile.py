"""A sampling profiler for the guest: where is the vCPU spending its time?

Every `period` seconds a thread kicks the vCPU out of KVM_RUN (Vcpu.kick); the run loop sees an
Interrupted exit, and the profiler records the guest's RIP there. With the kernel's System.map the
samples become function names. It is how pykvm found what made Linux boots slow on KVM-PVM hosts
(an MP-table scan, jitter entropy, a kallsyms walk): the guest cannot tell you, the VMM can look.

    pykvm boot bzImage --profile System.map        # the top functions at the end

Each sample costs one extra exit, so the default 10 ms period slows the guest by well under 1 %.

Distribution kernels ship a stub System.map (Debian's says "The real System.map is in the
linux-image-<version>-dbg package"). The kernel image carries its own symbol table, though:
`kallsyms-finder --bit-size 64 vmlinux` (PyPI package vmlinux-to-elf) reads it from the
decompressed payload (pykvm.boot.decompress.decompress_payload; it did not find it in the bzImage)
and prints it in System.map format. That is how Debian's cloud kernel was profiled here.
"""

from __future__ import annotations

import bisect
import collections
import threading
from pathlib import Path

from .workers import start_worker

RFLAGS_IF = 1 << 9       # interrupt enable flag (SDM Vol. 1, 3.4.3.2)


def load_system_map(path: str | Path) -> tuple[list[int], list[str]]:
    """Text symbols from a System.map: sorted addresses and their names."""
    pairs = []
    for line in Path(path).read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tTwW":
            try:
                pairs.append((int(parts[0], 16), parts[2]))
            except ValueError:
                continue
    pairs.sort()
    return [a for a, _ in pairs], [n for _, n in pairs]


def find_symbol(addrs: list[int], names: list[str], addr: int) -> tuple[str, int] | None:
    """The text symbol `addr` lies in, from load_system_map's lists, and the offset into it: the
    last symbol at or below `addr` (System.map gives only where each starts), or None below the
    first one."""
    i = bisect.bisect_right(addrs, addr) - 1
    return (names[i], addr - addrs[i]) if i >= 0 else None


class GuestProfiler:
    """Samples RIP on Interrupted exits; `start(machine)` installs it, `report()` summarizes."""

    def __init__(self, system_map: str | Path | None = None, period: float = 0.01):
        self.period = period
        self.samples: collections.Counter[int] = collections.Counter()
        self.by_vcpu: collections.Counter[tuple[int, int]] = collections.Counter()  # (vCPU, RIP)
        # vCPU -> samples taken with RFLAGS.IF clear: the guest was in an interrupt handler (x86
        # enters one through an interrupt gate with IF cleared, SDM Vol. 3A 6.12.1.3) or in code
        # that masks interrupts. On KVM-PVM, where all of it is emulated, a large share means the
        # guest's own interrupt work is where the time goes (docs/kvm-pvm.md, "Two vCPUs"). An AP
        # still waiting for its startup IPI (RFLAGS = 0x2 from reset) counts as interrupts off.
        self.irqs_off: collections.Counter[int] = collections.Counter()
        self._cpus = 1
        self._addrs, self._names = load_system_map(system_map) if system_map else ([], [])
        self._stop = threading.Event()
        # Said at the top of the report: a map with no text symbols is almost always a stub.
        self.note = (f"{system_map} names no kernel text symbols (a distribution's stub System.map?): "
                     "addresses are shown raw; kallsyms-finder (package vmlinux-to-elf) recovers "
                     "the symbols from the kernel image") if system_map and not self._addrs else ""

    def symbol(self, rip: int) -> str:
        found = find_symbol(self._addrs, self._names, rip)
        return f"{rip:#x}" if found is None else f"{found[0]}+{found[1]:#x}"

    def start(self, machine) -> None:
        machine.interrupted_handlers.append(self._sample)
        machine.on_stop.append(lambda stop: self.stop())   # no kicks once the run is over
        vcpus = list(getattr(machine, "vcpus", [machine.vcpu]))
        self._cpus = len(vcpus)

        def kicker() -> None:
            while not self._stop.wait(self.period):
                for vcpu in vcpus:          # every vCPU: each samples itself on its own thread
                    if vcpu.thread_id is not None:
                        vcpu.kick()

        start_worker("pykvm-profiler", kicker, machine.worker_failed)

    def stop(self) -> None:
        self._stop.set()

    def _sample(self, machine) -> None:
        vcpu = machine.vcpu                 # the vCPU of the thread that was kicked
        regs = vcpu.get_regs()
        rip, cpu = regs.rip, getattr(vcpu, "index", 0)
        self.samples[rip] += 1
        self.by_vcpu[(cpu, rip)] += 1
        if not regs.rflags & RFLAGS_IF:
            self.irqs_off[cpu] += 1

    def report(self, top: int = 20) -> str:
        """The hottest functions (or addresses, without a System.map), with their share."""
        by_name: collections.Counter[str] = collections.Counter()
        for rip, n in self.samples.items():
            by_name[self.symbol(rip).split("+")[0]] += n
        total = sum(by_name.values()) or 1
        lines = [self.note] if self.note else []
        lines.append(f"{total} samples every {self.period * 1000:g} ms")
        per_cpu_total: collections.Counter[int] = collections.Counter()
        for (cpu, _), n in self.by_vcpu.items():
            per_cpu_total[cpu] += n
        if per_cpu_total:
            lines.append("interrupts off (RFLAGS.IF=0) in " + ", ".join(
                f"cpu{c} {100 * self.irqs_off[c] / n:.0f}%" for c, n in sorted(per_cpu_total.items()))
                + " of samples: interrupt handlers, or code masking interrupts")
        if self._cpus > 1:
            per_cpu: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
            for (cpu, rip), n in self.by_vcpu.items():
                per_cpu[self.symbol(rip).split("+")[0]][cpu] += n
            lines += [f"{100 * n / total:5.1f}%  {name}  ("
                      + ", ".join(f"cpu{c} {100 * k / total:.1f}%" for c, k in sorted(per_cpu[name].items()))
                      + ")" for name, n in by_name.most_common(top)]
        else:
            lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in by_name.most_common(top)]
        return "\n".join(lines)
