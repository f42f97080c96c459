"""Which page size does a pykvm guest's TLB really get? `python -m bench.tlb_reach [--rounds N]`

firmware/tlb_reach chases a pointer through every 4 KiB page of a 32 MiB buffer in a random order,
one cache line per page: the lines fit in the caches, 8192 pages do not fit in a TLB of 4 KiB
entries, 16 pages of 2 MiB do. Ticks per load therefore say whether the hardware walks 2 MiB or
4 KiB pages for guest RAM. The guest maps 2 MiB pages; on KVM-PVM the hardware walks KVM's shadow
page table, whose entries are 2 MiB only where the host's are too and the memory slot allows it.

Guest RAM backed three ways, rounds alternated, the median of each kept:
  thp, aligned      pykvm's MmapBackend: MAP_PRIVATE + MADV_HUGEPAGE, RAM on a 2 MiB boundary
  thp, misaligned   the same huge pages, RAM starting 1 MiB past a boundary (what an unaligned
                    mmap gave pykvm before MmapBackend aligned it: KVM disallows large pages in a
                    slot whose host and guest addresses disagree modulo 2 MiB)
  4 KiB             Machine(hugepages=False)
The ratio column is ticks per load against "thp, aligned". Timing noise on a loaded host moves the
absolute numbers; the gap between 2 MiB and 4 KiB pages is large enough to read through it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from pykvm import machine as _machine  # noqa: E402
from pykvm.memory import MmapBackend  # noqa: E402
from pykvm.testing.firmware import run_firmware  # noqa: E402

MiB = 1 << 20
BASE, BYTES, LOADS, PASSES = 16 * MiB, 32 * MiB, 4 << 20, 4
MEMORY = BASE + BYTES + 2 * MiB
_LINE = re.compile(r"tlb bytes=(\d+) pages=(\d+) loads=(\d+) best=(\d+)")


class _MisalignedBackend(MmapBackend):
    """Huge pages, but guest RAM 1 MiB past a 2 MiB boundary (the old, unaligned placement)."""

    def __init__(self, size: int, hugepages: bool = True):
        super().__init__(size + self.HUGE_PAGE, hugepages)
        self._view.release()
        self.offset += MiB
        self.size = size
        self._view = self._whole[self.offset:self.offset + size]


def probe(backing: str) -> float:
    """TSC ticks per load of the best pass, on guest RAM backed as `backing` says."""
    saved = _machine.MmapBackend
    if backing == "thp, misaligned":
        _machine.MmapBackend = _MisalignedBackend
    try:
        r = run_firmware("tlb_reach", args=[BASE, BYTES, LOADS, PASSES], memory=MEMORY,
                         timeout=300, hugepages=backing != "4 KiB")
    finally:
        _machine.MmapBackend = saved
    m = _LINE.search(r.text)
    if r.status != 0 or m is None:
        raise RuntimeError(f"tlb_reach failed: {r.stop} {r.text[-200:]}")
    return int(m.group(4)) / int(m.group(3))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    opts = ap.parse_args(argv)
    kinds = ("thp, aligned", "thp, misaligned", "4 KiB")
    runs: dict[str, list[float]] = {k: [] for k in kinds}
    load0 = os.getloadavg()[0]
    for _ in range(opts.rounds):
        for k in kinds:
            runs[k].append(probe(k))
    base = statistics.median(runs["thp, aligned"])
    print(f"pointer chase over {BYTES >> 20} MiB, one line per 4 KiB page, {LOADS} loads a pass; "
          f"median of {opts.rounds} rounds; load average {load0:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at the end")
    print(f"  {'guest RAM':<18} {'ticks/load':>10} {'ratio':>7}   rounds")
    for k in kinds:
        med = statistics.median(runs[k])
        print(f"  {k:<18} {med:10.1f} {med / base:6.2f}x   {', '.join(f'{x:.1f}' for x in runs[k])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
