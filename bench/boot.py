"""Row 3 of the table: the test kernel's boot to "Run /init", and the VMM's share of it.

    python -m bench.boot [--quick] [--build] [--irqchip kernel|user|all] [--timeout S]
                         [--kernel BZIMAGE [--initrd CPIO]]

Boots pykvm.assets.test_kernel() with initramfs() through pykvm.linux.LinuxVM(until=r"Run /init")
and reports the wall time of the run, the exits by kind (`vm.stats`) and the share of the wall
time spent in the VMM outside KVM_RUN: 1 - seconds_in_kvm_run / wall. With `--irqchip user` a
guest's `hlt` (interrupts on) exits and the VMM waits for the next interrupt itself, where the
in-kernel irqchip waits inside KVM_RUN: that idle time is the guest's, not VMM work, and is
counted with KVM_RUN (`seconds_halted`), so both rows measure the same thing. It boots with the C fast
path on and off (`fast_path=`); --quick boots with the fast path on only.

The test kernel takes minutes to compile, so the benchmark never builds it unless --build is given;
without it the row says how to build it. (`python -m pykvm.assets test-kernel` does the same.)

Interrupt controllers: `--irqchip kernel` (the default) boots with KVM's in-kernel PIC/IOAPIC/PIT;
`--irqchip user` with pykvm's Python i8259/i8254 models (issue 4), `--irqchip all` with both.
`IRQCHIPS` lists the modes; `boot_once(irqchip=...)` passes the mode to LinuxVM, and a LinuxVM
without an `irqchip` argument (older trees) gets a "n/a" row for "user" instead.

On a KVM-PVM host the kernel itself runs in KVM's instruction emulator (~1 us per instruction), so
the boot takes a minute or more and KVM_RUN dominates; on VT-x/AMD-V it takes a second or two
and the VMM's share is what this row is for.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from bench.table import Goal, Row, Section, format_table  # noqa: E402

UNTIL = r"Run /init"
GOAL = Goal("<=", 2.0, on="share")      # issue 6: the VMM's share of boot at most 2%
IRQCHIPS = ("kernel", "user")           # KVM's in-kernel PIC/PIT, or pykvm's Python models
DEFAULT_TIMEOUT = 600.0


@dataclass
class BootResult:
    reason: str
    wall: float                      # seconds in LinuxVM.run()
    setup: float                     # seconds to build the LinuxVM (load, decompress, devices)
    stats: dict = field(default_factory=dict)

    @property
    def in_kvm_run(self) -> float:
        return self.stats.get("seconds_in_kvm_run", 0.0)

    @property
    def halted(self) -> float:
        """irqchip="user": seconds the guest sat in `hlt` while the VMM waited for its next
        interrupt (pykvm.dispatch._hlt). With the in-kernel irqchip KVM waits inside KVM_RUN."""
        return self.stats.get("seconds_halted", 0.0)

    @property
    def guest(self) -> float:
        """The guest's time: running in KVM_RUN, or idle in hlt (wherever the wait happened)."""
        return self.in_kvm_run + self.halted


def linuxvm_has_irqchip() -> bool:
    """Whether LinuxVM takes irqchip=: as a keyword of its own (older trees), or as a field of the
    MachineConfig its keyword options are routed to (pykvm/config.py)."""
    from pykvm.linux import LinuxVM
    if "irqchip" in inspect.signature(LinuxVM.__init__).parameters:
        return True
    try:
        from pykvm.config import MachineConfig
    except ImportError:
        return False
    return "irqchip" in getattr(MachineConfig, "__dataclass_fields__", {})


def boot_once(kernel: Path, initrd: Path, *, fast_path: bool, irqchip: str = "kernel",
              timeout: float = DEFAULT_TIMEOUT, memory: str | None = None) -> BootResult:
    from pykvm.linux import LinuxVM
    kwargs = dict(initrd=initrd, until=UNTIL, fast_path=fast_path)
    if memory is not None:
        kwargs["memory"] = memory
    if irqchip != "kernel" or linuxvm_has_irqchip():
        kwargs["irqchip"] = irqchip     # the issue-4 hook
    t = time.perf_counter()
    with LinuxVM(kernel, **kwargs) as vm:
        setup = time.perf_counter() - t
        t = time.perf_counter()
        stop = vm.run(timeout=timeout)
        wall = time.perf_counter() - t
        return BootResult(stop.reason, wall, setup, vm.stats)


def find_kernel(build: bool):
    """(bzImage, initramfs) or a reason string."""
    from pykvm.assets import AssetError, initramfs, test_kernel
    try:
        k = test_kernel(build=build)
    except AssetError as e:
        return f"n/a: {e}" + ("" if build else " (or give --build)")
    try:
        return k.bzimage, initramfs()
    except AssetError as e:
        return f"n/a: initramfs: {e}"


def _exit_summary(stats: dict) -> str:
    exits = sorted(stats.get("exits", {}).items(), key=lambda kv: -kv[1])
    total = sum(v for _, v in exits)
    parts = ", ".join(f"{k} {v}" for k, v in exits)
    line = f"exits: {total} ({parts}); handled in C: {stats.get('exits_handled_in_c', 0)}"
    kvm = stats.get("kvm", {})
    if kvm.get("insn_emulation"):
        # KVM's own count (pykvm/kvm/stats.py): on KVM-PVM every guest kernel instruction, so the
        # boot's work in a figure that moves far less with the host's load than the wall time
        # above it (only the timer tick's share grows with wall time: pykvm/kvm/stats.py).
        line += (f"; KVM: {kvm.get('exits', 0)} exits in all, "
                 f"{kvm['insn_emulation'] / 1e6:.1f} M instructions emulated")
    return line


def boot_rows(quick: bool = False, build: bool = False, irqchips=IRQCHIPS,
              timeout: float = DEFAULT_TIMEOUT, kernel: Path | None = None,
              initrd: Path | None = None) -> Section:
    what = f"{kernel.name} + {initrd.name if initrd else 'no initrd'}" if kernel else \
        "test kernel + initramfs"
    sec = Section(f'3. Linux boot to "Run /init" ({what}): wall time against time '
                  "in KVM_RUN; goal on the VMM's share, 1 - in KVM_RUN / wall")
    found = (kernel, initrd) if kernel else find_kernel(build)
    configs = [(True, "fast path on")] + ([] if quick else [(False, "fast path off")])
    if isinstance(found, str):
        for irqchip in irqchips:
            for _, label in configs:
                sec.rows.append(Row(f"boot, {label}, irqchip {irqchip}", note=found))
        return sec
    kernel, initrd = found
    fast_on: dict[str, BootResult] = {}      # irqchip -> the fast-path-on boot, for the comparison
    for irqchip in irqchips:
        if irqchip != "kernel" and not linuxvm_has_irqchip():
            for _, label in configs:
                sec.rows.append(Row(f"boot, {label}, irqchip {irqchip}",
                                    note="n/a: LinuxVM has no irqchip= yet (issue 4)"))
            continue
        for fast, label in configs:
            name = f"boot, {label}, irqchip {irqchip}"
            try:
                r = boot_once(kernel, initrd, fast_path=fast, irqchip=irqchip, timeout=timeout)
            except Exception as e:
                sec.rows.append(Row(name, note=f"failed: {type(e).__name__}: {e}"))
                continue
            if r.reason != "until":
                sec.rows.append(Row(name, note=f"did not reach {UNTIL!r}: stop {r.reason} after "
                                               f"{r.wall:.0f} s",
                                    details=[_exit_summary(r.stats)]))
                continue
            if fast:
                fast_on[irqchip] = r
            base = "in KVM_RUN + hlt wait" if r.halted else "in KVM_RUN"
            row = Row(name, r.wall, "s", r.guest or None, base, GOAL)
            row.note = (f"VMM share {row.share:.2f}% ({r.wall - r.guest:.2f} s of VMM work"
                        + (f"; {r.halted:.2f} s the guest idled in hlt, waited out by the VMM"
                           if r.halted else "") + ")"
                        if row.share is not None else "")
            row.details = [_exit_summary(r.stats),
                           f"set-up before the first instruction {r.setup:.2f} s; "
                           "KVM-PVM gaps completed: "
                           f"{sum(r.stats.get('pvm_gaps_completed', {}).values())}"]
            sec.rows.append(row)
    if not quick and "kernel" in fast_on:
        sec.rows.append(_small_boot_row(kernel, initrd, timeout, fast_on["kernel"]))
    if "kernel" in fast_on and "user" in fast_on:
        k, u = fast_on["kernel"], fast_on["user"]
        exits_k, exits_u = _total_exits(k.stats), _total_exits(u.stats)
        sec.rows.append(Row("boot, irqchip user against kernel (fast path on)", u.wall, "s", k.wall,
                            "irqchip kernel",
                            details=[f"exits {exits_u} against {exits_k} "
                                     f"({exits_u / max(exits_k, 1):.2f}x); interrupts injected by "
                                     f"the VMM: {sum(u.stats.get('interrupts_injected', {}).values())}"]))
    if quick:
        sec.notes.append("--quick: fast path off not booted")
    return sec


# The test suite boots the test kernel with 64 MiB (tests/test_linux.py, MEMORY): part of a boot
# is per 4 KiB page of guest RAM (struct page set-up, handing pages to the buddy allocator: a
# quarter of a 256 MiB boot on KVM-PVM, docs/kvm-pvm.md), so the suite's boots are shorter than
# the rows above, which keep LinuxVM's default size for comparison with earlier runs.
SUITE_MEMORY = "64M"


def _small_boot_row(kernel: Path, initrd: Path, timeout: float, default: BootResult) -> Row:
    name = f"boot, fast path on, irqchip kernel, {SUITE_MEMORY}iB (the test suite's size)"
    try:
        r = boot_once(kernel, initrd, fast_path=True, timeout=timeout, memory=SUITE_MEMORY)
    except Exception as e:
        return Row(name, note=f"failed: {type(e).__name__}: {e}")
    if r.reason != "until":
        return Row(name, note=f"did not reach {UNTIL!r}: stop {r.reason} after {r.wall:.0f} s")
    return Row(name, r.wall, "s", default.wall, "the default-size boot above",
               note=f"VMM share {100 * (1 - r.guest / r.wall):.2f}%")


def _total_exits(stats: dict) -> int:
    return sum(stats.get("exits", {}).values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="boot with the fast path on only")
    ap.add_argument("--build", action="store_true", help="build the test kernel if missing")
    ap.add_argument("--irqchip", choices=(*IRQCHIPS, "all"), default="all")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    ap.add_argument("--kernel", type=Path, help="boot this kernel instead of the test kernel")
    ap.add_argument("--initrd", type=Path, help="with --kernel: this initramfs")
    opts = ap.parse_args(argv)
    from bench import header_lines
    irqchips = IRQCHIPS if opts.irqchip == "all" else (opts.irqchip,)
    print(format_table("pykvm Linux boot", header_lines(),
                       [boot_rows(opts.quick, opts.build, irqchips, opts.timeout, opts.kernel,
                                  opts.initrd)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
