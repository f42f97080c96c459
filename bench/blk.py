"""Row 4 of the table: virtio-blk sequential read and write against host pread/pwrite.

    python -m bench.blk [--quick]

The guest half needs a firmware virtio-blk driver (firmware/*virtio*blk*.c or .S) that reads and
writes a disk image sequentially and reports its own timing; pykvm has the device
(pykvm/virtio/blk.py) but no such driver yet, so the guest rows print "n/a" with the reason. The
host baseline is measured anyway, on a scratch file of the same size in the same run: sequential
pwrite then pread in 128 KiB requests through the page cache, which is what the device's backend
(pykvm.host.DiskImage) does for the guest - so when the driver lands, the ratio is the cost of the
virtqueue round trips and nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.table import Goal, Row, Section, format_table  # noqa: E402

GOAL = Goal(">=", 0.95)        # the guest-work goal of issue 6, applied to block I/O too
REQUEST = 128 << 10


def firmware_driver() -> Path | None:
    fw = REPO / "firmware"
    for p in sorted(fw.glob("*")):
        if p.suffix in (".c", ".S") and "virtio" in p.stem and "blk" in p.stem:
            return p
    return None


def host_rates(size: int) -> tuple[float, float]:
    """(pwrite MB/s, pread MB/s) for `size` bytes in REQUEST-sized sequential requests."""
    buf = bytes(range(256)) * (REQUEST // 256)
    with tempfile.NamedTemporaryFile(prefix="pykvm-bench-blk-") as f:
        fd = f.fileno()
        t = time.perf_counter()
        for off in range(0, size, REQUEST):
            os.pwrite(fd, buf, off)
        os.fsync(fd)
        w = time.perf_counter() - t
        t = time.perf_counter()
        for off in range(0, size, REQUEST):
            if len(os.pread(fd, REQUEST, off)) != REQUEST:
                raise RuntimeError("short read from the scratch file")
        r = time.perf_counter() - t
    return size / w / 1e6, size / r / 1e6


def blk_rows(quick: bool = False) -> Section:
    size = (16 if quick else 64) << 20
    sec = Section(f"4. virtio-blk sequential I/O, {size >> 20} MiB in {REQUEST >> 10} KiB requests "
                  "(baseline: host pwrite+fsync / pread on a file, same run)")
    wr, rd = host_rates(size)
    drv = firmware_driver()
    if drv is None:
        reason = "n/a: no firmware virtio-blk driver yet (pykvm/virtio/blk.py has the device)"
    else:
        reason = f"n/a: {drv.relative_to(REPO)} exists but bench/blk.py does not drive it yet"
    sec.rows.append(Row("virtio-blk sequential write", None, "MB/s", wr, "pwrite", GOAL, reason))
    sec.rows.append(Row("virtio-blk sequential read", None, "MB/s", rd, "pread", GOAL, reason))
    return sec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller file")
    opts = ap.parse_args(argv)
    from bench import header_lines
    print(format_table("pykvm virtio-blk", header_lines(), [blk_rows(opts.quick)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
