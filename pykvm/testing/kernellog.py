"""The kernel's own reports of trouble in a guest's console log: WARN and BUG splats, oopses,
panics.

A boot that reaches its shell can still have hit a WARN_ON on the way; a test that only waits for a
prompt would never know. `kernel_splats(console)` finds them, so a test can assert there are none
(or none but one it has a measured reason to expect: pykvm/lane/tcg.py).

What a splat looks like (Linux 6.1, kernel/panic.c `__warn` and lib/bug.c `report_bug`): a WARN
prints a "cut here" line, the WARN's own message, then "WARNING: CPU: n PID: n at <where>",
registers and a call trace, and ends with "---[ end trace <id> ]---". A BUG, an oops or a general
protection fault print "BUG: ...", "Oops: ...", "general protection fault..." and a call trace,
often followed by "Kernel panic - not syncing". A pr_warn() that merely contains the word WARNING
(the SRSO mitigation notice, say) is not a splat: only the kernel's report formats count here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CUT_HERE = "------------[ cut here ]------------"
_END_TRACE = re.compile(r"---\[ end trace [0-9a-f]+ \]---")
_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\]\s?")
# The first line of each kind of report the kernel prints outside a "cut here" block: a WARN
# without one, BUG (also the watchdog's "BUG: soft lockup"), an oops, a general protection fault,
# a panic, a hung task, an RCU stall, or a bare call trace (dump_stack).
_REPORT = re.compile(r"^WARNING: CPU: \d+|\bBUG: |^Oops: |general protection fault|"
                     r"Kernel panic - not syncing|INFO: task .* blocked for more than|"
                     r"rcu: INFO: .* detected stalls|^Call Trace:")
_REPORT_LINES = 60  # at most this many lines of one report outside a block (its registers, trace)


@dataclass
class Splat:
    """One report: its first meaningful line (a WARN's message, or the BUG/Oops/panic line) and all
    its lines, timestamps removed."""
    message: str
    lines: list[str] = field(default_factory=list)


def _strip(line: str) -> str:
    return _TIMESTAMP.sub("", line.rstrip("\r")).rstrip()


def _report(lines: list[str], start: int, most: int | None) -> list[str]:
    """The lines of the report that begins at ``lines[start]``: up to its "end trace" line, but
    never into the next "cut here" (another report begins there, and a splat a test tolerates must
    not hide it) and, with ``most``, at most that many lines."""
    block = [lines[start]]
    for i in range(start + 1, len(lines)):
        if lines[i] == CUT_HERE or len(block) == most:
            break
        block.append(lines[i])
        if _END_TRACE.search(lines[i]):
            break
    return block


def kernel_splats(console: str) -> list[Splat]:
    """Every report of trouble in `console`, in order. A "cut here" block is one splat, named by
    the line after "cut here" (a WARN's message); a report line outside any block (a BUG, an oops,
    a panic, a call trace with no header) starts a splat of its own, named by that line. Either
    runs to its "end trace" line or the next "cut here" (a report line outside a block: at most
    _REPORT_LINES lines)."""
    lines = [_strip(line) for line in console.splitlines()]
    splats: list[Splat] = []
    i = 0
    while i < len(lines):
        if lines[i] == CUT_HERE:
            block = _report(lines, i, most=None)
            splats.append(Splat(next((b for b in block[1:] if b), ""), block))
        elif _REPORT.search(lines[i]):
            block = _report(lines, i, most=_REPORT_LINES)
            splats.append(Splat(lines[i], block))
        else:
            block = [lines[i]]
        i += len(block)
    return splats
