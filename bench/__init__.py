"""pykvm's benchmark table (issue 6): `python -m bench [--quick]`.

The project started from the 2007 comparison of KVM against QEMU/kqemu, Xen and bare metal (gzip,
LAME, RAMspeed). This package measures pykvm the same way, every row against a baseline taken in
the same run, and prints one table:

1. bench.exits     exit round trip: Python path, C fast path, raw C floor, QEMU, per CPL
                   (the measurements are bench/exit_cost.py's)
2. bench.compute   guest CPU and memory work against native: STREAM/RAMspeed loops, LZ77
                   compression (bench/stream.py, bench/compress.py run one each)
3. bench.boot      Linux boot to "Run /init": wall time, exits, the VMM's share
4. bench.blk       virtio-blk sequential read (firmware/virtio_blk) against host pread
5. bench.startup   VMM start-up to the first guest byte; resident memory beyond guest RAM
6. bench.snapshot  restore against a cold boot to the same point; memory of N clones (issue 13)

Each module runs alone too: `python -m bench.<name> [--quick]` or `python bench/<name>.py`.
bench/README.md says how to read the table.
"""

from __future__ import annotations

import os
import sys


def host_lines() -> list[str]:
    """What the numbers depend on: the kind of /dev/kvm, CPUs, load, Python."""
    from pykvm import pvm
    kind = pvm.host_kind()
    what = {
        "KVM-PVM": "guest CPL0 code is emulated, CPL3 runs natively; exits from CPL3 cost ~3x "
                   "CPL0's",
    }.get(kind, "hardware virtualization: guest code runs natively at every CPL")
    load = os.getloadavg()[0]
    return [f"host:   {kind} ({what})",
            f"        {os.cpu_count()} CPUs, load average {load:.2f} at start (a loaded host "
            "inflates every row; ratios are taken within this run), "
            f"Python {sys.version.split()[0]}"]


def header_lines() -> list[str]:
    try:
        return host_lines()
    except Exception as e:  # the table still prints without a host description
        return [f"host:   unknown ({type(e).__name__}: {e})"]
