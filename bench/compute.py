"""Guest CPU and memory work against native: STREAM-style bandwidth and LZ77 compression.

    python -m bench.compute [--quick] [--only stream|compress] [--backing thp|4k|both]

The 2007 benchmark ran gzip, LAME and RAMspeed inside each VMM and on bare metal. Here the same C
source (bench/kernels/*.c) is compiled twice with the same gcc flags - into a firmware program
(firmware/stream.c, firmware/compress.c) that runs at CPL3 in a pykvm guest, and into a host program
(bench/native_stream.c, bench/native_compress.c) - and both report TSC ticks for the same loops.

- Timing is `rdtsc` inside each program around each loop (best pass of several per run, the first
  a warm-up; the median over runs). KVM runs the guest's TSC at the host's rate, so ticks compare
  directly; they become seconds with the TSC frequency the native program measures. As a check,
  the guest also reports the ticks its whole main() took, which must fit inside the host's wall
  time for the run.
- SSE: the firmware runtime never sets CR4.OSFXSR, and main() runs at CPL3 where CR4 cannot be
  written, so firmware/stream.c asks for it with one `outb` to port 0xFC; `EnableSse` below does
  what an OS does at boot. (A KVM-PVM host runs CPL3 guest code under its own CR4, so there SSE
  works without it; on VT-x/AMD-V it would be #UD.) The integer loops and the compressor use
  general registers only.
- Guest RAM backing: pykvm.memory.MmapBackend maps guest RAM MAP_PRIVATE with MADV_HUGEPAGE
  (Machine(hugepages=True), the default), or without the madvise (hugepages=False: 4 KiB pages while
  THP is in "madvise" mode). The native program gets the same kind of mapping for each row, and
  /proc/self/smaps says how much of guest RAM really was huge.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))   # `python bench/compute.py` from a checkout

from bench.table import Goal, Row, Section, format_table  # noqa: E402
from pykvm.testing import firmware as F  # noqa: E402

KERNELS = HERE / "kernels"
MiB = 1 << 20
GUEST_BASE = 16 * MiB          # where the firmware programs put their arrays (arg0)
PORT_ENABLE_SSE = 0xFC         # firmware/stream.c
GOAL = Goal(">=", 0.95)        # issue 6: guest compute at least 0.95x native

# Sizes: (stream elements per array, stream passes, compress input bytes, compress passes)
# Rounds alternate native and guest runs. Within a run a cell keeps its best pass (load only ever
# makes a pass slower); across runs it takes the median, because on these VMs a whole run is lucky
# or unlucky: the same native binary gives 4.6 GB/s in one process and 10 GB/s in the next (where
# its memory landed, neighbours on the physical host), while its passes agree within a run.
DEFAULT = dict(stream_n=4 * MiB, stream_reps=5, rounds=21, lz_n=4 * MiB, lz_reps=4, lz_rounds=7)
QUICK = dict(stream_n=4 * MiB, stream_reps=5, rounds=5, lz_n=2 * MiB, lz_reps=4, lz_rounds=3)
BACKINGS = {"thp": True, "4k": False}    # name -> Machine(hugepages=...)


class BenchBuildError(Exception):
    pass


# ---------------------------------------------------------------- building

def native_cflags() -> list[str]:
    """The firmware's gcc flags without what only a freestanding program needs."""
    return [f for f in F.CFLAGS if f not in ("-ffreestanding", "-nostdlib")]


def _kernel_sources() -> list[Path]:
    return sorted(KERNELS.glob("*")) + [HERE / "native_common.h"]


def _digest(paths: list[Path], *extra: str) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    for e in extra:
        h.update(e.encode() + b"\0")
    return h.hexdigest()[:20]


def build_native(name: str) -> Path:
    """Compile bench/native_<name>.c (cached by a hash of its sources, flags and gcc)."""
    src = HERE / f"native_{name}.c"
    flags = native_cflags()
    key = _digest([src, *_kernel_sources()], *flags, F._tool_version("gcc"))
    out_dir = F.cache_root() / "bench" / key
    exe = out_dir / f"native_{name}"
    if not exe.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(f".tmp{os.getpid()}")
        r = subprocess.run(["gcc", *flags, "-no-pie", "-o", str(tmp), str(src)],
                           capture_output=True, text=True)
        if r.returncode:
            raise BenchBuildError(f"compiling {src.name} failed: "
                                  f"{(r.stderr or r.stdout).strip().splitlines()[:1]}")
        os.replace(tmp, exe)
    return exe


def build_guest(name: str) -> Path:
    """Build firmware/<name>.c. Its cache key (pykvm.testing.firmware) covers the program and the
    runtime but not the kernel it #includes from bench/kernels, so the kernels' hash picks the
    cache directory."""
    return F.build(name, cache=F.cache_root() / "bench-firmware" / _digest(_kernel_sources()))


def kernel_undefined_symbols(kernel: str) -> list[str]:
    """Symbols a kernel (bench/kernels/<kernel>_kernel.c) needs from outside, compiled as in the
    firmware: must be none, or guest and native would run different library code."""
    entry = {"stream": "void bench_entry(void *b, uint64_t n, struct stream_result *r)"
                       "{ stream_run(b, n, 2, 3, r); }",
             "lz": "void bench_entry(void *b, uint64_t n, struct lz_result *r)"
                   "{ lz_run(b, n, 2, r); }"}[kernel]
    code = f'#include "{KERNELS / (kernel + "_kernel.c")}"\n{entry}\n'
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "k.o"
        r = subprocess.run(["gcc", *F.CFLAGS, "-x", "c", "-c", "-", "-o", str(obj)], input=code,
                           capture_output=True, text=True)
        if r.returncode:
            raise BenchBuildError(f"compiling {kernel}_kernel.c failed: {r.stderr.strip()[:200]}")
        nm = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True)
    return [ln.split()[-1] for ln in nm.stdout.splitlines() if ln.strip()]


# ---------------------------------------------------------------- running

class EnableSse:
    """Port 0xFC: the guest asks for SSE. Sets CR4.OSFXSR (FXSAVE/SSE allowed) and OSXMMEXCPT (SIMD
    exceptions as #XM), sets CR0.MP and clears CR0.EM (SDM 13.1.3, "Initialization of the SSE
    extensions") - what an OS kernel does at boot and the firmware runtime leaves out."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.requests = 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        from pykvm.x86.cpu import CR0_MP, CR4_OSFXSR, CR4_OSXMMEXCPT
        self.requests += 1
        sregs = self.vcpu.get_sregs()
        sregs.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT
        sregs.cr0 = (sregs.cr0 | CR0_MP) & ~(1 << 2)   # CR0.EM (bit 2) off
        self.vcpu.set_sregs(sregs)


@dataclass
class GuestRun:
    status: int | None
    text: str
    stop: object
    wall: float                       # seconds in Machine.run
    exits: dict = field(default_factory=dict)
    ram_kib: int = 0                  # guest RAM resident after the run (smaps Rss)
    ram_huge_kib: int = 0             # ... of which transparent huge pages (AnonHugePages)


def smaps_of(address: int) -> dict[str, int]:
    """The /proc/self/smaps fields (kB) of the mapping that starts at `address`."""
    fields: dict[str, int] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                if inside:
                    break
                inside = int(head.split("-")[0], 16) == address
            elif inside and head.endswith(":"):
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    fields[head[:-1]] = int(parts[1])
    return fields


def run_guest(name: str, args: list[int], memory: int, *, hugepages: bool = True,
              timeout: float = 300) -> GuestRun:
    """Boot firmware `name` at CPL3 with `args` on a machine of `memory` bytes; run it to its
    exit."""
    from pykvm.devices.debugcon import DebugCon
    from pykvm.x86 import layout

    elf = build_guest(name)
    out = bytearray()
    with F.firmware_machine(memory, hugepages=hugepages) as m:
        m.add_pio(layout.PORT_DEBUG, 1, DebugCon(out.extend), "debugcon")
        m.add_exit_port()
        m.add_pio(PORT_ENABLE_SSE, 1, EnableSse(m.vcpu), "enable-sse")
        F.prepare(m, elf, cpl=3, args=args)
        t = time.perf_counter()
        stop = m.run(timeout=timeout)
        wall = time.perf_counter() - t
        rss = huge = 0
        for region in m.mem.regions:
            sm = smaps_of(region.backend.address())
            rss += sm.get("Rss", 0)
            huge += sm.get("AnonHugePages", 0)
        return GuestRun(stop.status if stop.reason == "exit" else None,
                        out.decode("utf-8", "replace"), stop, wall, m.vcpu.exit_counts(), rss, huge)


def run_native(name: str, args: list[int]) -> tuple[str, float]:
    exe = build_native(name)
    t = time.perf_counter()
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    if r.returncode:
        raise RuntimeError(f"{exe.name} exited {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()[:200]}")
    return r.stdout, wall


def _guest_failure(run: GuestRun) -> str:
    if run.status is None:
        return f"guest stopped: {run.stop.reason} {getattr(run.stop, 'message', '')}".strip()
    if run.status & ~0x1F == F.STATUS_EXCEPTION:
        return f"guest exception {run.status & 0x1F} ({run.text.strip().splitlines()[-1:]})"
    return f"guest exit status {run.status:#x}"


# ---------------------------------------------------------------- parsing

_STREAM_LINE = re.compile(r"^stream (\w+ \w+) ticks=(\d+) bytes=(\d+)$", re.M)
_STREAM_OK = re.compile(r"^stream ok=(\d+)(?: total_ticks=(\d+))?$", re.M)
_LZ_LINE = re.compile(r"^lz in=(\d+) out=(\d+) compress=(\d+) decompress=(\d+) "
                      r"fingerprint=(0x[0-9a-f]+) ok=(\d)$", re.M)
_TOTAL = re.compile(r"total_ticks=(\d+)")
_TSC = re.compile(r"^tsc_hz=(\d+)$", re.M)


@dataclass
class StreamReport:
    loops: dict[str, tuple[int, int]]    # name -> (best ticks, bytes per pass)
    ok: int
    total_ticks: int | None = None


def parse_stream(text: str) -> StreamReport:
    ok = _STREAM_OK.search(text)
    total = _TOTAL.search(text)
    return StreamReport({m[1]: (int(m[2]), int(m[3])) for m in _STREAM_LINE.finditer(text)},
                        int(ok[1]) if ok else 0, int(total[1]) if total else None)


@dataclass
class LzReport:
    in_bytes: int
    out_bytes: int
    compress_ticks: int
    decompress_ticks: int
    fingerprint: int
    ok: bool
    total_ticks: int | None = None


def parse_lz(text: str) -> LzReport | None:
    m = _LZ_LINE.search(text)
    if not m:
        return None
    total = _TOTAL.search(text)
    return LzReport(int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5], 16), m[6] == "1",
                    int(total[1]) if total else None)


def parse_tsc_hz(text: str) -> int:
    m = _TSC.search(text)
    if not m:
        raise RuntimeError("the native program printed no tsc_hz line")
    return int(m[1])


def mb_per_s(nbytes: int, ticks: int, tsc_hz: int) -> float:
    return nbytes / (ticks / tsc_hz) / 1e6


def _geomean(xs: list[float]) -> float:
    import math
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _median(runs: dict, key) -> float | None:
    import statistics
    return statistics.median(runs[key]) if runs.get(key) else None


def _round_up(x: int, to: int = 2 * MiB) -> int:
    return (x + to - 1) // to * to


def _tsc_check(total_ticks: int | None, tsc_hz: int, wall: float) -> str:
    """'' if the guest's own account of its run fits the host's clock, else a warning."""
    if total_ticks is None:
        return "guest gave no total_ticks"
    guest_s = total_ticks / tsc_hz
    if guest_s > wall * 1.02 + 0.01:
        return f"guest TSC says {guest_s:.2f} s, host clock {wall:.2f} s: TSC rates differ?"
    return ""


def _backing_note(run: GuestRun) -> str:
    if not run.ram_kib:
        return ""
    return f"guest RAM {run.ram_kib >> 10} MiB resident, {run.ram_huge_kib >> 10} MiB in THP"


def thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"\[(\w+)\]", text)
    return m[1] if m else text.strip()


# ---------------------------------------------------------------- the rows

def stream_rows(quick: bool = False, backings=("thp", "4k"), sizes: dict | None = None) -> Section:
    """STREAM/RAMspeed rows: for each backing, each of the 8 loops, guest MB/s against native."""
    s = dict(QUICK if quick else DEFAULT, **(sizes or {}))
    n, reps = s["stream_n"], s["stream_reps"]
    array_mib = n * 8 / MiB
    sec = Section(f"2a. Memory bandwidth, STREAM/RAMspeed loops, 3 arrays x {array_mib:g} MiB, "
                  f"median of {s['rounds']} runs' best of {reps - 1} passes "
                  "(guest CPL3 vs native, same code)")
    memory = _round_up(GUEST_BASE + 3 * n * 8) + 2 * MiB
    runs: dict[tuple[str, str, str], list[int]] = {}   # (backing, side, loop) -> best ticks per run
    nbytes: dict[str, int] = {}
    notes: dict[str, list[str]] = {b: [] for b in backings}
    tsc_hz = 0
    for _ in range(s["rounds"]):
        for backing in backings:
            huge = BACKINGS[backing]
            # Native and guest back to back, so a burst of load on a shared host hits both.
            text, _wall = run_native("stream", [n, reps, 3, int(huge)])
            tsc_hz = parse_tsc_hz(text)
            native = parse_stream(text)
            thp = re.search(r"^native_thp_kib=(-?\d+)$", text, re.M)
            if thp and int(thp[1]) >= 0:
                note = f"native arrays {int(thp[1]) >> 10} MiB in THP"
                if note not in notes[backing]:
                    notes[backing].append(note)
            if native.ok != 3:
                raise RuntimeError(f"native stream failed its check (ok={native.ok})")
            run = run_guest("stream", [GUEST_BASE, n, reps, 3], memory, hugepages=huge)
            guest = parse_stream(run.text)
            problems = []
            if run.status != 0:
                problems.append(_guest_failure(run))
            if guest.ok != 3 and run.status is not None:
                problems.append(f"guest arrays failed the check (ok={guest.ok})")
            tsc = _tsc_check(guest.total_ticks, tsc_hz, run.wall)
            for note in [*problems, tsc, _backing_note(run)]:
                if note and note not in notes[backing]:
                    notes[backing].append(note)
            for side, rep in (("native", native), ("guest", guest)):
                for loop, (ticks, b) in rep.loops.items():
                    nbytes[loop] = b
                    runs.setdefault((backing, side, loop), []).append(ticks)
    for backing in backings:
        label = "THP" if BACKINGS[backing] else "4 KiB pages"
        first = len(sec.rows)
        for loop in ("int copy", "int scale", "int add", "int triad",
                     "fp copy", "fp scale", "fp add", "fp triad"):
            g = _median(runs, (backing, "guest", loop))
            nat = _median(runs, (backing, "native", loop))
            sec.rows.append(Row(
                f"{loop}, {label}",
                mb_per_s(nbytes[loop], g, tsc_hz) if g else None, "MB/s",
                mb_per_s(nbytes[loop], nat, tsc_hz) if nat else None, "native", GOAL,
                note="" if g else "; ".join(notes[backing][:1]) or "no result"))
        measured = [r for r in sec.rows[first:] if r.value and r.baseline]
        if len(measured) == 8:
            # One number per backing that averages the per-loop noise: geometric means.
            sec.rows.append(Row(f"geomean of the 8 loops, {label}",
                                _geomean([r.value for r in measured]), "MB/s",
                                _geomean([r.baseline for r in measured]), "native", GOAL))
        for note in notes[backing]:
            sec.notes.append(f"{label}: {note}")
    sec.notes.append("THP: guest RAM (and the native arrays) MAP_PRIVATE + MADV_HUGEPAGE, pykvm's "
                     "default; 4 KiB pages: the same without the madvise")
    sec.notes.append(f"TSC {tsc_hz / 1e9:.3f} GHz (measured natively); "
                     f"host THP mode: {thp_mode()}; "
                     f"{s['rounds']} runs per cell")
    return sec


def compress_rows(quick: bool = False, backings=("thp",), sizes: dict | None = None) -> Section:
    """The gzip row: LZ77 compress and decompress MB/s of input, guest against native."""
    s = dict(QUICK if quick else DEFAULT, **(sizes or {}))
    n, reps = s["lz_n"], s["lz_reps"]
    sec = Section(f"2b. Compression, LZ77 hash chains (gzip -1..3-like), {n / MiB:g} MiB of "
                  f"text-like input, median of {s['lz_rounds']} runs' best of {reps - 1} passes")
    memory = _round_up(GUEST_BASE + 3 * n + n // 255 + 2 * MiB) + 2 * MiB
    runs: dict[tuple[str, str, str], list[int]] = {}
    notes: list[str] = []
    tsc_hz = 0
    for _ in range(s["lz_rounds"]):
        for backing in backings:
            huge = BACKINGS[backing]
            text, _wall = run_native("compress", [n, reps, int(huge)])
            tsc_hz = parse_tsc_hz(text)
            native = parse_lz(text)
            if native is None or not native.ok:
                raise RuntimeError("native compress failed its round trip")
            run = run_guest("compress", [GUEST_BASE, n, reps], memory, hugepages=huge)
            guest = parse_lz(run.text)
            new = []
            if run.status != 0:
                new.append(_guest_failure(run))
            if guest is not None:
                if not guest.ok:
                    new.append("guest round trip FAILED")
                if guest.fingerprint != native.fingerprint:
                    new.append("guest and native compressed streams differ")
                new.append(_tsc_check(guest.total_ticks, tsc_hz, run.wall))
            new.append(f"ratio {native.in_bytes / native.out_bytes:.2f}:1, round trip checked "
                       "in guest and natively, compressed streams identical"
                       if guest is not None and guest.ok and guest.fingerprint == native.fingerprint
                       else "")
            for note in new:
                if note and note not in notes:
                    notes.append(note)
            for side, rep in (("native", native), ("guest", guest)):
                if rep is None:
                    continue
                for what, ticks in (("compress", rep.compress_ticks),
                                    ("decompress", rep.decompress_ticks)):
                    runs.setdefault((backing, side, what), []).append(ticks)
    for backing in backings:
        label = "THP" if BACKINGS[backing] else "4 KiB pages"
        for what in ("compress", "decompress"):
            g = _median(runs, (backing, "guest", what))
            nat = _median(runs, (backing, "native", what))
            sec.rows.append(Row(f"LZ77 {what}, {label}", mb_per_s(n, g, tsc_hz) if g else None,
                                "MB/s", mb_per_s(n, nat, tsc_hz) if nat else None, "native", GOAL,
                                note="" if g else "; ".join(notes[:1]) or "no result"))
    sec.notes.extend(notes)
    return sec


def main(argv=None, *, default_only: str | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer passes and rounds")
    ap.add_argument("--only", choices=("stream", "compress"), default=default_only)
    ap.add_argument("--backing", choices=("thp", "4k", "both"), default="both",
                    help="guest RAM backing(s) to measure "
                         "(default both for stream, thp for compress)")
    opts = ap.parse_args(argv)
    from bench import header_lines
    sections = []
    stream_b = ("thp", "4k") if opts.backing == "both" else (opts.backing,)
    lz_b = ("thp",) if opts.backing == "both" else (opts.backing,)
    if opts.only in (None, "stream"):
        sections.append(stream_rows(opts.quick, stream_b))
    if opts.only in (None, "compress"):
        sections.append(compress_rows(opts.quick, lz_b))
    print(format_table("pykvm guest compute against native", header_lines(), sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
