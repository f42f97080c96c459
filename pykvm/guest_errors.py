"""Counting a guest's mistakes (STYLE.md rule 5): count every one, warn about the first of a kind.

A guest touching a register wrongly, a malformed virtqueue, a request past the end of a disk: the
device answers as hardware would (zeros, an error status) and the VM goes on. The VMM counts each
mistake by kind, where tests and `LinuxVM.stats` can see it, and logs the first of each kind as a
warning; the rest go to the debug log, so a guest that repeats a mistake in a loop cannot flood it.
"""

from __future__ import annotations

import collections
import logging


def count_guest_error(counter: collections.Counter, kind: str, log: logging.Logger, who: str,
                      detail: str = "") -> None:
    """Count one mistake of `kind` in `counter`; log it (who: the device that saw it)."""
    counter[kind] += 1
    log.log(logging.WARNING if counter[kind] == 1 else logging.DEBUG, "%s: %s %s", who, kind,
            detail)
