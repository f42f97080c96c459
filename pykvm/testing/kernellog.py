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


def kernel_splats(console: str) -> list[Splat]:
    """Every report of trouble in `console`, in order. A "cut here" block is one splat, named by
    the line after "cut here" (a WARN's message); a report line outside any block (a BUG, an oops,
    a panic, a call trace with no header) starts a splat of its own, named by that line, which
    runs to its "end trace" line (or the next "cut here", or _REPORT_LINES lines)."""
    lines = [_strip(line) for line in console.splitlines()]
    splats: list[Splat] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line == CUT_HERE:
            block = [line]
            i += 1
            while i < len(lines):
                block.append(lines[i])
                i += 1
                if _END_TRACE.search(block[-1]):
                    break
            message = next((b for b in block[1:] if b), "")
            splats.append(Splat(message, block))
            continue
        if _REPORT.search(line):
            block = [line]
            i += 1
            while i < len(lines) and lines[i] != CUT_HERE and len(block) < _REPORT_LINES:
                block.append(lines[i])
                i += 1
                if _END_TRACE.search(block[-1]):
                    break
            splats.append(Splat(line, block))
            continue
        i += 1
    return splats
