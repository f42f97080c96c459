"""Row 4 of the table: virtio-blk sequential read and write against host pread/pwrite.

    python -m bench.blk [--quick]

Read: bench/virtio_blk.py (the virtio engineer's benchmark: firmware/virtio_blk at CPL3 reads a
disk image through pykvm.virtio.VirtioBlk, timed by the VMM between two marker writes, against host
pread of the same page-cached file, plus the preadv-into-guest-RAM ceiling) supplies the read row
and its goal; this module puts it into the table.

Write: firmware/virtio_blk has no write benchmark mode yet, so that row says n/a; its baseline
(sequential pwrite + fsync of a scratch file of the same size) is measured anyway.
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

GOAL = Goal(">=", 0.7)         # the virtio-blk goal of issue 5 (bench/virtio_blk.py's)
REQUEST = 128 << 10


def host_write_rate(size: int) -> float:
    """pwrite MB/s for `size` bytes in REQUEST-sized sequential requests, then fsync."""
    buf = bytes(range(256)) * (REQUEST // 256)
    with tempfile.NamedTemporaryFile(prefix="pykvm-bench-blk-") as f:
        fd = f.fileno()
        t = time.perf_counter()
        for off in range(0, size, REQUEST):
            os.pwrite(fd, buf, off)
        os.fsync(fd)
        return size / (time.perf_counter() - t) / 1e6


def blk_rows(quick: bool = False) -> Section:
    size = (16 if quick else 64) << 20
    sec = Section("4. virtio-blk sequential I/O (baseline: host pread / pwrite+fsync of a file, "
                  "same run)")
    try:
        from bench.virtio_blk import virtio_blk_rows
    except ImportError as e:
        sec.rows.append(Row("guest virtio-blk read", note=f"n/a: bench/virtio_blk.py: {e}"))
    else:
        try:
            read = virtio_blk_rows(quick)
            sec.rows.extend(read.rows)
            sec.notes.extend([f"read: {read.title}", *read.notes])
        except Exception as e:
            sec.rows.append(Row("guest virtio-blk read", note=f"failed: {type(e).__name__}: {e}"))
    sec.rows.append(Row(f"guest virtio-blk write, {size >> 20} MiB", None, "MB/s",
                        host_write_rate(size), "pwrite", GOAL,
                        "n/a: firmware/virtio_blk has a read benchmark mode only"))
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
