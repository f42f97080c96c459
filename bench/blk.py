"""Row 4 of the table: virtio-blk sequential read and write against host pread / pwrite+fsync.

    python -m bench.blk [--quick]

bench/virtio_blk.py measures (firmware/virtio_blk at CPL3 reads and writes a disk image through
pykvm.virtio.VirtioBlk, 1 MiB and 4 KiB requests, timed by the VMM between two marker writes,
against the host's pread, and pwrite then fsync, of the same file in the same request size); this
module puts its rows into the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.table import Row, Section, format_table  # noqa: E402


def blk_rows(quick: bool = False) -> Section:
    sec = Section("4. virtio-blk sequential I/O (baseline: host pread / pwrite+fsync of the same "
                  "file, same request size, same run)")
    try:
        from bench.virtio_blk import virtio_blk_rows
        rows = virtio_blk_rows(quick)
    except Exception as e:
        sec.rows.append(Row("guest virtio-blk", note=f"failed: {type(e).__name__}: {e}"))
        return sec
    sec.rows.extend(rows.rows)
    sec.notes.extend([rows.title, *rows.notes])
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
