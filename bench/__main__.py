"""`python -m bench [--quick]`: every benchmark, one table of ratios measured in this run.

Rows (bench/__init__.py lists the modules): 1 exit round trip, 2 guest compute against native,
3 Linux boot, 4 virtio-blk, 5 start-up and memory. Defaults take a few minutes plus two Linux boots
(a minute or more each on a KVM-PVM host); --quick takes about two minutes with one boot.
Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import header_lines  # noqa: E402
from bench.table import Section, failed_section, format_table  # noqa: E402

SECTIONS = ("exits", "stream", "compress", "boot", "blk", "startup", "snapshot")


def _runners(opts):
    from bench import blk, boot, compute, exits, snapshot, startup
    irqchips = boot.IRQCHIPS if opts.irqchip == "all" else (opts.irqchip,)
    return {
        "exits": ("1. Exit round trip", lambda: exits.exit_rows(opts.quick, opts.skip_qemu)),
        "stream": ("2a. Memory bandwidth", lambda: compute.stream_rows(opts.quick)),
        "compress": ("2b. Compression", lambda: compute.compress_rows(opts.quick)),
        "boot": ("3. Linux boot", lambda: boot.boot_rows(opts.quick, opts.build, irqchips,
                                                         opts.boot_timeout)),
        "blk": ("4. virtio-blk", lambda: blk.blk_rows(opts.quick)),
        "startup": ("5. VMM start-up and memory", lambda: startup.startup_rows(opts.quick)),
        "snapshot": ("6. Snapshots", lambda: snapshot.snapshot_rows(opts.quick, opts.build)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer iterations, one Linux boot (~2 min)")
    ap.add_argument("--only", action="append", choices=SECTIONS,
                    help="run only this section (repeatable)")
    ap.add_argument("--skip-qemu", action="store_true", help="leave out the QEMU exit row")
    ap.add_argument("--build", action="store_true", help="build the test kernel if it is missing")
    ap.add_argument("--irqchip", choices=("kernel", "user", "all"), default="all",
                    help="interrupt controller(s) for the boot row (user: issue 4)")
    ap.add_argument("--boot-timeout", type=float, default=600.0)
    opts = ap.parse_args(argv)

    from pykvm.kvm import Kvm, KvmUnavailable
    try:
        Kvm().close()
    except KvmUnavailable as e:
        print(f"/dev/kvm unusable: {e}", file=sys.stderr)
        return 1
    header = header_lines()
    started = time.perf_counter()
    sections: list[Section] = []
    runners = _runners(opts)
    for key in SECTIONS:
        if opts.only and key not in opts.only:
            continue
        title, fn = runners[key]
        t = time.perf_counter()
        print(f"bench: {title} ...", file=sys.stderr, flush=True)
        try:
            sections.append(fn())
        except Exception as e:  # one broken benchmark must not sink the table
            sections.append(failed_section(title, e))
        print(f"bench: {title}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    marks = [r.mark for s in sections for r in s.rows]
    footer = [f"goals from issue 6; {marks.count('pass')} pass, {marks.count('MISS')} miss, "
              f"{sum(1 for s in sections for r in s.rows if r.value is None)} rows not measured; "
              f"total {time.perf_counter() - started:.0f} s"
              + ("; --quick" if opts.quick else "")]
    print(format_table("pykvm benchmark table (issue 6): every ratio against a baseline measured "
                       "in this run", header, sections, footer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
