"""Row 4 of the table: virtio-blk sequential read and write against host pread/pwrite.

    python -m bench.blk [--quick]

Read: firmware/virtio_blk (a polling virtio-mmio driver at CPL3) in its benchmark mode reads a disk
image sequentially in 128 KiB requests (64 KiB segments, 4 requests per notify) through
pykvm.virtio.VirtioBlk on pykvm.host.DiskImage; the guest writes 1 and 2 to a marker port just
before its first request and after its last completion, and the host times the span between the
two. The guest's checksum (the first byte of every 4 KiB) is checked against the file. Baseline:
host pread of the same file in the same request size, in the same run (both read through the host's
page cache: the file was just written). Each side: best of a few runs.

Write: the driver has no write benchmark mode yet, so that row says n/a; its baseline (pwrite +
fsync of a scratch file of the same size) is measured anyway.
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


MARKER_PORT = 0x510            # any port nothing else decodes
PROGRAM = "virtio_blk"


def firmware_driver() -> Path | None:
    p = REPO / "firmware" / f"{PROGRAM}.c"
    return p if p.is_file() else None


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


def host_read_seconds(path: Path, size: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        for off in range(0, size, REQUEST):
            if len(os.pread(fd, REQUEST, off)) != REQUEST:
                raise RuntimeError("short read from the disk image")
        return time.perf_counter() - t
    finally:
        os.close(fd)


class _Marker:
    """The guest's start/stop marks for the timed span."""

    def __init__(self):
        self.times: dict[int, float] = {}

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.times[value] = time.perf_counter()


def guest_read_seconds(path: Path, size: int) -> tuple[float, int]:
    """Seconds between the guest's marks while it reads `size` bytes; and its checksum."""
    import re

    from pykvm.devices.debugcon import DebugCon, ExitPort
    from pykvm.host.disk import DiskImage
    from pykvm.machine import Stop
    from pykvm.testing import firmware as F
    from pykvm.virtio.attach import attach_mmio
    from pykvm.virtio.blk import VirtioBlk
    from pykvm.x86 import layout

    elf = F.build(PROGRAM)
    out = bytearray()
    marker = _Marker()
    with F.firmware_machine(32 << 20, irqchip="kernel") as m:
        m.add_pio(layout.PORT_DEBUG, 1, DebugCon(out.extend), "debugcon")
        m.add_pio(layout.PORT_EXIT, 4, ExitPort(lambda s: m.request_stop(Stop("exit", s))), "exit")
        m.add_pio(MARKER_PORT, 1, marker, "bench-marker")
        attach_mmio(m, VirtioBlk(DiskImage(path, readonly=True)), 0)
        F.prepare(m, elf, args=[1, layout.VIRTIO_MMIO_BASE, size, REQUEST, 64 << 10, 4,
                                MARKER_PORT])
        stop = m.run(timeout=300)
    text = out.decode(errors="replace")
    if stop.reason != "exit" or stop.status != 0:
        raise RuntimeError(f"guest stopped: {stop.reason} status {stop.status}: "
                           f"{text.strip().splitlines()[-1:]}")
    got = re.search(r"bench bytes=(\d+) .*checksum=(\d+)", text)
    if not got or int(got[1]) != size or 1 not in marker.times or 2 not in marker.times:
        raise RuntimeError(f"no benchmark report from the guest: {text.strip()[-120:]}")
    return marker.times[2] - marker.times[1], int(got[2])


def blk_rows(quick: bool = False) -> Section:
    import random
    size = (16 if quick else 64) << 20
    runs = 2 if quick else 4
    sec = Section(f"4. virtio-blk sequential I/O, {size >> 20} MiB in {REQUEST >> 10} KiB requests "
                  "(baseline: host pread / pwrite+fsync of a file, same run)")
    wr = host_write_rate(size)
    sec.rows.append(Row("virtio-blk sequential write", None, "MB/s", wr, "pwrite", GOAL,
                        "n/a: firmware/virtio_blk has a read benchmark mode only"))
    if firmware_driver() is None:
        sec.rows.append(Row("virtio-blk sequential read", None, "MB/s", None, "pread", GOAL,
                            "n/a: no firmware virtio-blk driver (firmware/virtio_blk.c)"))
        return sec
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-blk-") as tmp:
        path = Path(tmp) / "disk.img"
        data = random.Random(6).randbytes(size)
        path.write_bytes(data)
        want = sum(data[i] for i in range(0, size, 4096))
        host, guest, note = [], [], ""
        for _ in range(runs):     # interleaved
            host.append(host_read_seconds(path, size))
            try:
                secs, checksum = guest_read_seconds(path, size)
            except Exception as e:
                note = f"failed: {type(e).__name__}: {e}"
                break
            if checksum != want:
                note = "failed: the guest read other data than the file holds"
                break
            guest.append(secs)
    sec.rows.append(Row("virtio-blk sequential read", size / min(guest) / 1e6 if guest else None,
                        "MB/s", size / min(host) / 1e6, "pread", GOAL,
                        note or f"best of {runs}; data checked; request = 128 KiB in 2 segments, "
                                "4 per notify"))
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
