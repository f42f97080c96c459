"""Progress lines on stderr: ``pykvm: [asset] message (elapsed)``.

Fetching packages takes seconds and building the test kernel minutes, so every
step says what it is doing. Output goes to stderr so that ``--print-path``
keeps stdout clean for scripts. ``PYKVM_QUIET=1`` silences it.
"""

from __future__ import annotations

import os
import sys
import time


def _quiet() -> bool:
    return os.environ.get("PYKVM_QUIET", "") not in ("", "0")


def format_elapsed(seconds: float) -> str:
    """``75.2`` -> ``"1m15s"``; ``4.25`` -> ``"4.2s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


class Progress:
    """Reports the steps of building one asset, with time since it started."""

    def __init__(self, asset: str) -> None:
        self.asset = asset
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, message: str) -> None:
        if _quiet():
            return
        print(f"pykvm: [{self.asset}] {message} ({format_elapsed(self.elapsed)})",
              file=sys.stderr, flush=True)
