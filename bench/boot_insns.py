"""Where a Linux boot's emulated instructions go, initcall by initcall (KVM-PVM).

    python -m bench.boot_insns [--memory 256M] [--top 30] [--kernel BZIMAGE --initrd CPIO
                                [--system-map MAP]] [--append ARGS]

On a KVM-PVM host every instruction of the guest kernel is run by KVM's instruction emulator, and
KVM counts them (`insn_emulation`, read through KVM_GET_STATS_FD: pykvm/kvm/stats.py). That count
moves far less with the host's load than wall time, so it is the figure to compare two kernel
configurations or two sets of kernel arguments with on a shared machine - with one caveat: the
timer tick comes every 10 ms of real time, so a boot slowed by load also runs more tick handlers
(~0.12-0.16 M instructions per second of wall time for the test kernel; a boot at load 3 counted
31 M where a quiet one counts 24 M). Compare boots of similar wall time; the wall time is printed.

This boots the kernel to "Run /init" with `initcall_debug ignore_loglevel`, reads the count each
time the console completes a line, and prints:
- instructions inside each initcall (between its "calling" and "returned" lines),
- the longest stretches between two console lines (work before the console is up, work that
  prints nothing, and asynchronous work such as unpacking the initramfs, which runs whenever the
  initcall thread sleeps and is then counted inside whichever initcall was waiting).

What it cannot see: a `rep movs`/`rep stos` counts once per 1024 iterations (KVM re-enters the
guest only that often, arch/x86/kvm/emulate.c, writeback), so copy- and clear-heavy code is worth
more time than its count says; a sampling profile (`pykvm boot --profile System.map`) shows time.
The extra printing of initcall_debug itself costs instructions (a few M for the test kernel).
On VT-x/AMD-V only the rare instructions KVM emulates are counted, and this says so.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

UNTIL = r"Run /init"
CALLING = re.compile(r"calling  (\S+) @ \d+")
RETURNED = re.compile(r"initcall (\S+) returned -?\d+ after")
NAMED = re.compile(r"(calling  |initcall )(\S+)")


@dataclass
class Costs:
    total: int
    initcalls: list[tuple[int, str]]     # (instructions, initcall), most first
    stretches: list[tuple[int, str]]     # (instructions, the line they followed), most first


def costs(marks: list[tuple[int, str]], total: int, name=lambda s: s) -> Costs:
    """Attribute instruction counts to initcalls and to the stretches between console lines.

    `marks` holds (count when the line was complete, the line) in console order; `total` is the
    count at the end; `name` turns an initcall's printed name (a symbol, or an address when the
    kernel has no KALLSYMS) into a readable one."""
    started: dict[str, int] = {}
    calls: list[tuple[int, str]] = []
    stretches: list[tuple[int, str]] = []
    before, previous = 0, "(before the first console line)"
    for count, line in marks + [(total, "")]:
        named = NAMED.sub(lambda m: m.group(1) + name(m.group(2)), previous)
        stretches.append((count - before, named))
        before, previous = count, line
        if m := CALLING.search(line):
            started[m.group(1)] = count
        elif (m := RETURNED.search(line)) and m.group(1) in started:
            calls.append((count - started.pop(m.group(1)), name(m.group(1))))
    calls.sort(key=lambda c: -c[0])
    stretches.sort(key=lambda s: -s[0])
    return Costs(total, calls, stretches)


def symbol_namer(system_map: Path | None):
    """Printed initcall name -> function name: a kernel without KALLSYMS prints addresses
    ("0xffffffff81a9e951"), which System.map resolves; symbol names pass through."""
    if system_map is None or not system_map.exists():
        return lambda s: s
    from pykvm.profile import find_symbol, load_system_map
    addrs, names = load_system_map(system_map)

    def name(printed: str) -> str:
        if not printed.startswith("0x"):
            return printed.split("+")[0]
        found = find_symbol(addrs, names, int(printed.split("+")[0], 16))
        return printed if found is None else found[0]
    return name


def boot(kernel: Path, initrd: Path, memory: str, append: str, timeout: float):
    """Boot to UNTIL; ([(count, line)], total count, stop reason, wall seconds)."""
    from pykvm.linux import LinuxVM
    marks: list[tuple[int, str]] = []
    args = " ".join(a for a in ("initcall_debug ignore_loglevel", append) if a)
    with LinuxVM(kernel, initrd=initrd, memory=memory, until=UNTIL, append=args) as vm:
        vcpu = vm.machine.vcpus[0]
        count = lambda: vcpu.kvm_stats().get("insn_emulation", 0)  # noqa: E731
        vm.console.on_line(r".+", lambda m: marks.append(
            (count(), m.string.decode(errors="replace").strip())))
        t = time.perf_counter()
        stop = vm.run(timeout=timeout)
        return marks, count(), stop.reason, time.perf_counter() - t


def report(c: Costs, top: int) -> str:
    out = [f"{c.total / 1e6:.2f} M instructions emulated to {UNTIL!r}; "
           f"{len(c.initcalls)} initcalls, "
           f"{sum(n for n, _ in c.initcalls) / 1e6:.2f} M inside them"]
    out.append(f"the {top} costliest initcalls:")
    out += [f"  {n / 1e6:7.3f} M  {name}" for n, name in c.initcalls[:top]]
    out.append(f"the {top} longest stretches between console lines (what followed the line):")
    out += [f"  {n / 1e6:7.3f} M  after: {line[:110]}" for n, line in c.stretches[:top]]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", type=Path,
                    help="bzImage (default: the test kernel, built if missing)")
    ap.add_argument("--initrd", type=Path, help="initramfs (default: pykvm's busybox one)")
    ap.add_argument("--system-map", type=Path, help="resolves initcall addresses (default: the "
                    "test kernel's, or System.map beside --kernel)")
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--append", default="", help="more kernel arguments")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--timeout", type=float, default=600.0)
    opts = ap.parse_args(argv)
    from pykvm.assets import AssetError, initramfs, test_kernel
    from pykvm.pvm.host import KVM_PVM, host_kind
    try:
        kernel = opts.kernel or test_kernel(build=True).bzimage
        initrd = opts.initrd or initramfs()
    except AssetError as e:
        print(f"boot_insns: {e}", file=sys.stderr)
        return 2
    system_map = opts.system_map or kernel.parent / "System.map"
    if host_kind() != KVM_PVM:
        print("note: this host is not KVM-PVM: KVM emulates only the rare instructions hardware "
              "virtualization cannot run, so the counts below are not the boot's work")
    marks, total, reason, wall = boot(kernel, initrd, opts.memory, opts.append, opts.timeout)
    if reason != "until":
        print(f"boot_insns: the guest did not reach {UNTIL!r} (stopped: {reason})", file=sys.stderr)
        return 1
    print(f"{opts.memory} guest RAM, {wall:.1f} s wall time (the tick's share of the count grows "
          "with it)")
    print(report(costs(marks, total, symbol_namer(system_map)), opts.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
