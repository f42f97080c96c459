"""Row 1 of the table: what one userspace port-I/O exit costs, per guest CPL, against the floor.

    python -m bench.exits [--quick] [--skip-qemu]

The measurements are bench/exit_cost.py's (imported, not copied; `python -m bench.exit_cost` still
prints that script's own, more detailed table): the same `out` loop under pykvm's Python path,
pykvm's C fast path, a bare C KVM_RUN loop (the floor: what any VMM must pay on this host) and QEMU
(real mode only: it runs the loop as its BIOS). Ratios are to the floor at the same CPL.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from bench import exit_cost as X  # noqa: E402
from bench.table import Goal, Row, Section, format_table  # noqa: E402

GOAL_C = Goal("<=", 1.05)         # issue 6: exits handled in C within 5% of the floor
GOAL_PYTHON = Goal("<=", 1.3)     # ... and through Python within 30%
QUICK_ITERATIONS = {"real": 5000, "cpl0": 5000, "cpl3": 3000}
QUICK_ROUNDS, ROUNDS = 2, 5


def exit_rows(quick: bool = False, skip_qemu: bool = False) -> Section:
    counts = QUICK_ITERATIONS if quick else {m: v[1] for m, v in X.MODES.items()}
    rounds = QUICK_ROUNDS if quick else ROUNDS
    sec = Section("1. Exit round trip: one port-I/O exit to the VMM and back, us per exit "
                  f"(baseline: raw C KVM_RUN loop at the same CPL; best of {rounds} round(s))")
    floor, blob, elf = X.build_floor(), X.build_bios(), X.F.build("exit_storm")
    fast = X.fast_path_available()
    best: dict[tuple[str, str], X.Row] = {}

    def keep(key: str, mode: str, fn) -> None:
        try:
            row = fn()
        except Exception as e:  # one broken path must not sink the table
            row = X.Row(key, mode, counts[mode], note=f"failed: {type(e).__name__}: {e}")
        old = best.get((key, mode))
        if old is None or old.us is None or (row.us is not None and row.us < old.us):
            best[(key, mode)] = row

    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):   # rounds interleave the paths, so load bursts hit them alike
            for mode in X.MODES:
                n = counts[mode]
                keep("floor", mode, lambda: X.measure_floor(floor, mode, n, blob, elf))
                keep("python", mode, lambda: X.measure_pykvm(mode, n, blob, elf))
                if fast:
                    keep("c", mode, lambda: X.measure_pykvm(mode, n, blob, elf, fast=True))
                if mode == "real" and not skip_qemu:
                    keep("qemu", mode, lambda: X.measure_qemu(n, blob, Path(tmp)))

    for mode, (label, _) in X.MODES.items():
        fl = best.get(("floor", mode))
        fl_us = fl.us if fl else None

        def row(key: str, name: str, goal: Goal | None, missing: str) -> Row:
            r = best.get((key, mode))
            if r is None:
                return Row(f"{name}, {label}", note=missing)
            return Row(f"{name}, {label}", r.us, "us", fl_us, "floor", goal,
                       note=r.note if r.us is None else "")

        sec.rows.append(Row(f"raw C floor, {label}", fl_us, "us", ratio=1.0 if fl_us else None,
                            note=(fl.note if fl and fl.us is None
                                  else f"the baseline; {counts[mode]} exits per run")))
        sec.rows.append(row("python", "Python path", GOAL_PYTHON, "not measured"))
        sec.rows.append(row("c", "C fast path", GOAL_C,
                            "n/a: Machine(fast_path=) not built yet"))
        if mode == "real":
            sec.rows.append(row("qemu", "QEMU -accel kvm", None,
                                "skipped (--skip-qemu)" if skip_qemu else "not measured"))
        else:
            sec.rows.append(Row(f"QEMU -accel kvm, {label}",
                                note="n/a: the QEMU row runs the real-mode BIOS loop only"))
    sec.notes.append(f"QEMU: {X.qemu_version()}")
    return sec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer exits, one round")
    ap.add_argument("--skip-qemu", action="store_true")
    opts = ap.parse_args(argv)
    from bench import header_lines
    print(format_table("pykvm exit round trip", header_lines(),
                       [exit_rows(opts.quick, opts.skip_qemu)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
