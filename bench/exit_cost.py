"""What one userspace port-I/O exit costs: pykvm against the floor and against QEMU.

    python bench/exit_cost.py [--iterations N] [--skip-qemu]

The same guest loop - `out` to a port, N times - runs under four VMMs, in one run:

  (a) pykvm, Python path: Machine.run() -> Vcpu.run() -> typed IoOut -> handle_exit -> Bus ->
      a device model (DebugCon for the real-mode loop, PostCode for exit_storm);
  (b) pykvm with the exit handled in C (`Machine(fast_path=True)`, pykvm/kvm/fastpath.py: the C run
      loop answers POST and debug-console writes itself); where that option does not exist
      the rows say "n/a (not built yet)";
  (a1), (a2) rungs below (a): a Python loop that only calls KVM_RUN through the binding, and
      one that also decodes each exit into a typed value (Vcpu.run()); with (a) and (c) they say
      what each layer costs per exit, at each CPL;
  (c) the floor: bench/floor.c, a bare C KVM_RUN loop that does nothing per exit but count;
  (d) QEMU (`qemu-system-x86_64 -accel kvm -M pc`, isa-debugcon on 0xE9), real mode only: it
      runs the 64 KiB BIOS blob bench/realmode_loop.S from the reset vector, with five times the
      iterations (its whole-run timing includes its start-up; see Timing).

Guest loops:
  real mode, CPL0   bench/realmode_loop.S at F000:FFF0: `out %al,$0xe9; dec; jnz` in 16-bit code
  long mode, CPL0   firmware/exit_storm with main() at CPL0 (args block flag)
  long mode, CPL3   firmware/exit_storm at CPL3 (IOPL=3 and an all-zero I/O bitmap)
On a KVM-PVM host CPL0 guest code is emulated (~1 us per instruction), so the CPL0 loops pay for
three emulated instructions per exit and the CPL3 loop for a native #GP-and-emulate of `out`;
on VT-x/AMD-V the three are close. Always say which CPL an exit-cost number was taken at.

Timing: pykvm's Python path and the floor time the exits from the first write to the storm port to
the write to the exit port (N round trips), so boot and set-up are not counted. Exits handled in
C (pykvm's fast path, QEMU) never reach a clock of ours, so those run with N/5 and N iterations,
three times each, and the difference of the two best whole runs is divided by 4N/5. Every pykvm
and floor row checks that the device counted exactly N writes.
Each measurement has a fixed iteration count; the whole script takes well under a minute here.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))   # `python bench/exit_cost.py` from a checkout

from pykvm.testing import firmware as F  # noqa: E402

STORM_PORT_ELF = 0x80       # exit_storm's port (PostCode's)
STORM_PORT_REAL = 0xE9      # the real-mode blob's port (DebugCon's, QEMU's isa-debugcon)
BIOS_BASE = 0xF0000
BIOS_SIZE = 0x10000

MODES = {  # mode -> (label, default iterations)
    "real": ("real mode, CPL0", 20000),
    "cpl0": ("long mode, CPL0", 20000),
    "cpl3": ("long mode, CPL3", 10000),
}


@dataclass
class Row:
    path: str
    mode: str
    iterations: int
    us: float | None = None
    note: str = ""


# ---------------------------------------------------------------- host and tools

def host_kind() -> str:
    if os.path.exists("/sys/module/kvm_pvm"):
        return ("KVM-PVM (/sys/module/kvm_pvm exists): guest CPL0 code is emulated, CPL3 runs "
                "natively")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if re.search(r"\bvmx\b", flags):
        return "KVM on Intel VT-x"
    if re.search(r"\bsvm\b", flags):
        return "KVM on AMD-V"
    return "KVM (hardware support unknown)"


def _cache_dir(*sources: Path) -> Path:
    h = hashlib.sha256()
    for s in sources:
        h.update(s.name.encode() + b"\0" + s.read_bytes())
    d = F.cache_root() / "bench" / h.hexdigest()[:20]
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run(argv: list[str], what: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{what} failed: {(r.stderr or r.stdout).strip().splitlines()[:1]}")


def build_floor() -> Path:
    src = HERE / "floor.c"
    out = _cache_dir(src) / "floor"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        _run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(src)], "compiling bench/floor.c")
        os.replace(tmp, out)
    return out


def build_bios() -> Path:
    src = HERE / "realmode_loop.S"
    d = _cache_dir(src)
    out = d / "realmode_loop.bin"
    if not out.exists():
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            obj, elf, binf = (Path(tmp) / n for n in ("loop.o", "loop.elf", "loop.bin"))
            _run(["gcc", "-c", str(src), "-o", str(obj)], "assembling bench/realmode_loop.S")
            _run(["ld", "-Ttext=0", "-o", str(elf), str(obj)], "linking the BIOS blob")
            _run(["objcopy", "-O", "binary", "-j", ".text", str(elf), str(binf)], "objcopy")
            if binf.stat().st_size != BIOS_SIZE:
                raise RuntimeError(f"BIOS blob is {binf.stat().st_size} bytes, not 64 KiB")
            os.replace(binf, out)
    return out


def bios_with_count(blob: Path, n: int, directory: Path) -> Path:
    data = bytearray(blob.read_bytes())
    struct.pack_into("<I", data, 0, n)       # realmode_loop.S: `count` is the first dword
    p = directory / f"loop-{n}.bin"
    p.write_bytes(data)
    return p


# ---------------------------------------------------------------- (a)/(b) pykvm

class _Clocked:
    """Stands in for the storm port's device until the first write: notes the time, then puts
    the device itself back on the bus, so the N timed exits pay for nothing of the benchmark's."""

    def __init__(self, bus, port: int, device):
        self.bus, self.port, self.device = bus, port, device
        self.t0: float | None = None

    def read(self, offset, size):
        return self.device.read(offset, size)

    def write(self, offset, size, value):
        self.t0 = time.perf_counter()
        self.bus.unregister(self.port)
        self.bus.register(self.port, 1, self.device, "storm")
        self.device.write(offset, size, value)


def fast_path_available() -> bool:
    """Whether pykvm can handle exits in C yet (Machine(fast_path=True), pykvm/kvm/fastpath.py)."""
    from pykvm.machine import Machine
    return "fast_path" in inspect.signature(Machine.__init__).parameters


def _pykvm_once(mode: str, n: int, blob: Path, elf: Path, fast: bool):
    """One run of the guest loop; returns (stop, storm-device write count, seconds from the first
    storm write to the exit write or None if the writes never reached Python, seconds of the
    whole run)."""
    from pykvm.devices.debugcon import DebugCon, ExitPort, PostCode
    from pykvm.machine import Machine, Stop
    from pykvm.x86.cpu import setup_real_mode

    kwargs = {"irqchip": "none"}
    if fast:
        kwargs["fast_path"] = True
    t_exit = []
    with Machine(16 << 20, **kwargs) as m:
        m.add_pio(0xF4, 4, ExitPort(lambda s: (t_exit.append(time.perf_counter()),
                                                m.request_stop(Stop("exit", s)))), "exit")
        if mode == "real":
            device, port = DebugCon(lambda b: None), STORM_PORT_REAL
            data = bytearray(blob.read_bytes())
            struct.pack_into("<I", data, 0, n)
            m.mem.write(BIOS_BASE, data)
            setup_real_mode(m.vcpu, 0xF000, 0xFFF0)
        else:
            device, port = PostCode(), STORM_PORT_ELF
            m.add_pio(0xE9, 1, DebugCon(lambda b: None), "debugcon")
            F.prepare(m, elf, cpl=0 if mode == "cpl0" else 3, args=[n, STORM_PORT_ELF])
        if fast:
            # The C loop answers the port itself; the model's counters stay right
            # (PostCode.writes lives in the shared block, DebugCon.bytes_out is updated on drain).
            (m.fast.bind_debugcon if mode == "real" else m.fast.bind_post)(port, device)
            storm = device
            m.add_pio(port, 1, device, "storm")
        else:
            storm = _Clocked(m.pio, port, device)
            m.add_pio(port, 1, storm, "storm")
        start = time.perf_counter()
        stop = m.run(timeout=120)
        end = time.perf_counter()
    count = device.bytes_out if mode == "real" else device.writes
    first = getattr(storm, "t0", None)
    return stop, count, (t_exit[0] - first) if first is not None and t_exit else None, end - start


# Rows timed as the difference of two whole runs (N/5 and N exits) take each run's best of
# PAIRS: the best of the differences would favour a pair whose short run was unlucky.
PAIRS = 3


def measure_pykvm(mode: str, n: int, blob: Path, elf: Path, fast: bool = False) -> Row:
    row = Row("(b) pykvm, exit handled in C" if fast else "(a) pykvm, Python path", mode, n)
    small = max(n // 5, 1)
    # Exits answered in C never reach a Python clock: those rows use two whole runs' difference.
    wants = [small, n] * PAIRS if fast else [n]
    best: dict[int, float] = {}
    for want in wants:
        stop, count, first_to_exit, whole = _pykvm_once(mode, want, blob, elf, fast)
        if stop.reason != "exit" or stop.status != 0:
            row.note = f"failed: {stop.reason} {stop.message}".strip()
            return row
        if count != want:
            row.note = f"failed: the device counted {count} writes of {want}"
            return row
        t = whole if fast else first_to_exit
        best[want] = min(best.get(want, t), t)
    if fast:
        row.us = (best[n] - best[small]) / (n - small) * 1e6
        row.note = f"two whole runs, difference of bests of {PAIRS}"
    else:
        row.us = best[n] / n * 1e6
    return row


# ---------------------------------------------------------------- (a1)/(a2) where (a)'s time goes

LADDER = {   # row name -> what the Python loop does per exit
    "(a1) Python loop: KVM_RUN only": "kvm_run",
    "(a2) Python loop: + typed exit": "typed",
}


def measure_ladder(mode: str, n: int, blob: Path, elf: Path, step: str) -> Row:
    """Rungs below (a): a Python loop that only calls KVM_RUN through the binding (one cffi call
    per exit), then one that also decodes each exit into a typed value (Vcpu.run()). With (a) and
    (c) they show what each layer costs per exit - and that after an exit from guest CPL3 the same
    Python work costs several times what it costs after a CPL0 exit on a KVM-PVM host."""
    from pykvm.devices.debugcon import DebugCon, PostCode
    from pykvm.kvm._lib import lib
    from pykvm.machine import Machine, handle_exit
    from pykvm.kvm import exits as E
    from pykvm.x86.cpu import setup_real_mode

    name = next(k for k, v in LADDER.items() if v == step)
    row = Row(name, mode, n)
    with Machine(16 << 20, irqchip="none") as m:
        if mode == "real":
            port = STORM_PORT_REAL
            data = bytearray(blob.read_bytes())
            struct.pack_into("<I", data, 0, n + 2)
            m.mem.write(BIOS_BASE, data)
            setup_real_mode(m.vcpu, 0xF000, 0xFFF0)
            m.add_pio(port, 1, DebugCon(lambda b: None), "storm")
        else:
            port = STORM_PORT_ELF
            m.add_pio(0xE9, 1, DebugCon(lambda b: None), "debugcon")
            m.add_pio(port, 1, PostCode(), "storm")
            F.prepare(m, elf, cpl=0 if mode == "cpl0" else 3, args=[n + 2, port])
        vcpu = m.vcpu
        while True:   # set-up and boot exits, handled as usual, up to the first storm write
            e = vcpu.run()
            if isinstance(e, E.IoOut) and e.port == port:
                break
            if handle_exit(m, e) is not None:
                row.note = "failed: the guest stopped before its loop"
                return row
        if step == "kvm_run":
            run, c = lib.pykvm_run, vcpu._c
            t0 = time.perf_counter()
            for _ in range(n):
                run(c)
            dt = time.perf_counter() - t0
        else:
            run = vcpu.run
            t0 = time.perf_counter()
            for _ in range(n):
                run()
            dt = time.perf_counter() - t0
        e = vcpu.run()   # the loop's last write: so all n timed exits were the loop's
        if not (isinstance(e, E.IoOut) and e.port == port):
            row.note = f"failed: expected the storm port, got {e!r}"
            return row
    row.us = dt / n * 1e6
    return row


# ---------------------------------------------------------------- (c) the floor

# The floor is the baseline of every ratio: each round takes its best of FLOOR_RUNS processes (a
# fresh process was seen up to 10% slower than the same loop a moment later), so a slow draw of the
# baseline never flatters the other rows.
FLOOR_RUNS = 3


def measure_floor(floor: Path, mode: str, n: int, blob: Path, elf: Path) -> Row:
    if mode == "real":
        argv = [str(floor), "bios", str(blob), "0", str(n), hex(STORM_PORT_REAL)]
    else:
        argv = [str(floor), "elf", str(elf), "0" if mode == "cpl0" else "3", str(n),
                hex(STORM_PORT_ELF)]
    row = Row("(c) floor: raw C KVM_RUN loop", mode, n)
    best = None
    for _ in range(FLOOR_RUNS):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        m = re.search(r"count=(\d+) status=(\d+) ns=(\d+)", r.stdout)
        if r.returncode or not m:
            row.note = f"failed: {(r.stderr or r.stdout).strip()[:100]}"
            return row
        count, status, ns = map(int, m.groups())
        if count != n or status != 0:
            row.note = f"failed: {count} writes of {n}, status {status}"
            return row
        best = ns if best is None else min(best, ns)
    row.us = best / n / 1e3
    return row


# ---------------------------------------------------------------- (d) QEMU

QEMU = "qemu-system-x86_64"


# QEMU runs QEMU_SCALE times as many exits: its two whole runs include its own start-up (a
# hundred milliseconds or more, varying by several ms), which must stay small beside the exits.
QEMU_SCALE = 5


def measure_qemu(n: int, blob: Path, workdir: Path) -> Row:
    n *= QEMU_SCALE
    row = Row("(d) QEMU -accel kvm, isa-debugcon", "real", n)
    exe = shutil.which(QEMU)
    if exe is None:
        row.note = f"failed: {QEMU} not installed (Debian: qemu-system-x86)"
        return row

    def one(count: int) -> float:
        bios = bios_with_count(blob, count, workdir)
        argv = [exe, "-accel", "kvm", "-M", "pc", "-m", "16", "-display", "none", "-nodefaults",
                "-no-reboot", "-bios", str(bios), "-chardev", "null,id=dbg",
                "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
        t = time.perf_counter()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        dt = time.perf_counter() - t
        # isa-debug-exit: the process exits with (value << 1) | 1; the blob writes 0.
        if r.returncode != 1:
            err = [ln for ln in r.stderr.splitlines() if "warning" not in ln]
            raise RuntimeError(f"exit status {r.returncode}: {(err or [''])[0][:100]}")
        return dt

    try:
        small = max(n // 5, 1)
        one(small)                                   # warm the page cache
        t_small, t_big = float("inf"), float("inf")
        for _ in range(PAIRS):
            t_small, t_big = min(t_small, one(small)), min(t_big, one(n))
        row.us = (t_big - t_small) / (n - small) * 1e6
        row.note = f"two whole runs, difference of bests of {PAIRS}"
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
        row.note = f"failed: {e}"
    return row


def qemu_version() -> str:
    exe = shutil.which(QEMU)
    if not exe:
        return "not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


# ---------------------------------------------------------------- the table

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, help="iterations per measurement (default: "
                    + ", ".join(f"{v[0]} {v[1]}" for v in MODES.values()) + ")")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds; each cell shows its best (default 3)")
    ap.add_argument("--skip-qemu", action="store_true")
    opts = ap.parse_args(argv)

    from pykvm.kvm import KvmUnavailable
    if opts.repeat < 1:
        ap.error("--repeat must be at least 1")
    counts = {m: opts.iterations or v[1] for m, v in MODES.items()}
    started = time.perf_counter()
    print("pykvm exit-cost benchmark: one userspace port-I/O exit, guest `out` to VMM and back")
    print(f"host:  {host_kind()}")
    print(f"       {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
          f"(a loaded host inflates every row), Python {sys.version.split()[0]}, "
          f"{qemu_version()}")
    try:
        floor, blob, elf = build_floor(), build_bios(), F.build("exit_storm")
    except (RuntimeError, F.FirmwareError) as e:
        print(f"cannot build the benchmark guests: {e}")
        return 1

    fast = fast_path_available()
    measurements: dict[tuple[str, str], list[Row]] = {}

    def measure(path_key: str, mode: str, fn) -> None:
        try:
            row = fn()
        except Exception as e:  # one broken path must not sink the table
            row = Row(path_key, mode, counts[mode], note=f"failed: {type(e).__name__}: {e}")
        measurements.setdefault((row.path, mode), []).append(row)

    from pykvm.kvm import Kvm
    try:
        Kvm().close()
    except KvmUnavailable as e:
        print(f"/dev/kvm unusable: {e}")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        # Rounds interleave the paths, so a burst of load on a shared host hits them alike;
        # each cell reports its best round.
        for _ in range(opts.repeat):
            for mode in MODES:
                n = counts[mode]
                measure("(c) floor: raw C KVM_RUN loop", mode,
                        lambda: measure_floor(floor, mode, n, blob, elf))
                measure("(a) pykvm, Python path", mode,
                        lambda: measure_pykvm(mode, n, blob, elf))
                for key, step in LADDER.items():
                    measure(key, mode, lambda: measure_ladder(mode, n, blob, elf, step))
                if fast:
                    measure("(b) pykvm, exit handled in C", mode,
                            lambda: measure_pykvm(mode, n, blob, elf, fast=True))
                if mode == "real" and not opts.skip_qemu:
                    measure("(d) QEMU -accel kvm, isa-debugcon", mode,
                            lambda: measure_qemu(n, blob, Path(tmp)))
    rows: list[Row] = []
    for (path, mode), rs in measurements.items():
        good = [r for r in rs if r.us is not None]
        best = min(good, key=lambda r: r.us) if good else rs[0]
        if good and len(good) < len(rs):
            best.note = (best.note + f"; {len(rs) - len(good)} of {len(rs)} rounds failed").lstrip("; ")
        rows.append(best)
    for mode in MODES:
        if not fast:
            rows.append(Row("(b) pykvm, exit handled in C", mode, counts[mode],
                            note="n/a (not built yet)"))
        if mode == "real" and opts.skip_qemu:
            rows.append(Row("(d) QEMU -accel kvm, isa-debugcon", mode, counts[mode],
                            note="skipped (--skip-qemu)"))

    floors = {r.mode: r.us for r in rows if r.path.startswith("(c)") and r.us}
    print()
    print(f"{'VMM path':<38} {'guest loop (CPL)':<18} {'iters':>6} {'us/exit':>9} "
          f"{'x floor':>8}  note")
    print("-" * 100)
    for mode in MODES:
        for r in sorted((r for r in rows if r.mode == mode), key=lambda r: r.path):
            us = f"{r.us:9.2f}" if r.us is not None else f"{'-':>9}"
            ratio = f"{r.us / floors[mode]:8.2f}" if r.us and floors.get(mode) else f"{'-':>8}"
            print(f"{r.path:<38} {MODES[mode][0]:<18} {r.iterations:>6} {us} {ratio}  {r.note}")
    print("-" * 100)
    print(f"best of {opts.repeat} rounds per cell; total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
