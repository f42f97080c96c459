"""How long the guest has been let run: wall time minus the spans something held it.

`pykvm boot --timeout N` (Machine.run(timeout)) ends a run after N seconds. A person stepping
through a kernel in gdb holds the vCPUs for minutes while the guest does nothing: that time must
not count, or the VM is killed under them. So the machine keeps a RunClock: the gdb stub calls
hold() when it stops the vCPUs and release() when gdb lets them go (pykvm/gdb/vcpus.py), and the
timeout watches RunClock.elapsed() instead of the wall clock.

The clock is time.monotonic (never jumps with the date); what it measures is "the VMM let the
vCPUs run", not CPU time used by the guest: a guest halted waiting for an interrupt is running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RunClock:
    """A stopwatch that can be held. `restart()` zeroes it (keeping a hold in place: a VM held by
    `--gdb-wait` before its first run starts held)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._cv = threading.Condition()
        self._used = 0.0                        # seconds run before the current span
        self._since: float | None = clock()     # start of the current running span; None: held

    @property
    def held(self) -> bool:
        return self._since is None

    def restart(self) -> None:
        with self._cv:
            self._used = 0.0
            if self._since is not None:
                self._since = self._clock()
            self._cv.notify_all()

    def hold(self) -> None:
        with self._cv:
            if self._since is not None:
                self._used += self._clock() - self._since
                self._since = None
                self._cv.notify_all()

    def release(self) -> None:
        with self._cv:
            if self._since is None:
                self._since = self._clock()
                self._cv.notify_all()

    def elapsed(self) -> float:
        with self._cv:
            return self._elapsed()

    def _elapsed(self) -> float:
        return self._used + (0.0 if self._since is None else self._clock() - self._since)

    def remaining(self, seconds: float) -> float | None:
        """Seconds of running left until `seconds` have elapsed (<= 0: they have); None while
        held (nothing can elapse until release())."""
        with self._cv:
            return None if self._since is None else seconds - self._elapsed()

    def wait_for(self, seconds: float, cancelled: threading.Event) -> bool:
        """Block until `seconds` of running time have elapsed (True) or `cancelled` is set and
        cancel_waits() called (False). Sleeps through holds without polling."""
        with self._cv:
            while not cancelled.is_set():
                left = None if self._since is None else seconds - self._elapsed()
                if left is not None and left <= 0:
                    return True
                self._cv.wait(left)
            return False

    def cancel_waits(self) -> None:
        with self._cv:
            self._cv.notify_all()


class RunDeadline:
    """Call `on_expiry()` once `seconds` of the clock's running time have passed (a thread of its
    own, like threading.Timer, but counting only running time). cancel() before then: never."""

    def __init__(self, clock: RunClock, seconds: float, on_expiry: Callable[[], None]):
        self.clock = clock
        self.seconds = seconds
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._wait, args=(on_expiry,),
                                        name="pykvm-timeout", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _wait(self, on_expiry: Callable[[], None]) -> None:
        if self.clock.wait_for(self.seconds, self._cancelled):
            on_expiry()

    def cancel(self) -> None:
        self._cancelled.set()
        self.clock.cancel_waits()
