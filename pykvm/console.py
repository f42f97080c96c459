"""Console output from the guest: kept, searched, and copied to wherever the user wants it.

A guest's serial port (or debug port) hands its bytes to `ConsoleLog.write`. The log keeps them all,
tees them to sinks (the terminal, a file), and lets a test suite wait for a line:

    vm.console.expect(r"Run /init as init process", timeout=60)

`expect` searches everything since the last match (like pexpect), so awaiting lines in order works.
"""

from __future__ import annotations

import re
import threading
import time
from typing import BinaryIO, Callable


class ExpectTimeout(TimeoutError):
    """The awaited output did not appear in time. Carries the console's tail for the report."""

    def __init__(self, pattern: str, timeout: float, tail: str):
        super().__init__(f"{pattern!r} did not appear within {timeout:g} s; console ended with:\n{tail}")
        self.pattern = pattern
        self.tail = tail


class ConsoleLog:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0                       # where the next expect() starts searching
        self._cond = threading.Condition()
        self._sinks: list[Callable[[bytes], object]] = []
        self._watchers: list[tuple[re.Pattern, Callable[[re.Match], None]]] = []
        self._scan = 0                      # how far watchers have looked
        self.closed = False

    # ---- input side (devices) ----
    def write(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            self._cond.notify_all()
        for sink in self._sinks:
            sink(data)
        if self._watchers and b"\n" in data:
            self._check_watchers()

    def close(self) -> None:
        """No more output will come (the VM stopped); wakes any expect()."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    # ---- outputs ----
    def tee(self, sink: Callable[[bytes], object]) -> None:
        """Also send every future byte to `sink` (e.g. sys.stdout.buffer.write)."""
        self._sinks.append(sink)

    def tee_file(self, f: BinaryIO) -> None:
        def write(data: bytes) -> None:
            f.write(data)
            f.flush()
        self._sinks.append(write)

    def on_line(self, pattern: str, fn: Callable[[re.Match], None]) -> None:
        """Call fn(match) when a complete output line matches `pattern` (e.g. "Kernel panic")."""
        self._watchers.append((re.compile(pattern.encode()), fn))

    def _check_watchers(self) -> None:
        end = self._buf.rfind(b"\n") + 1
        chunk = bytes(self._buf[self._scan:end])
        self._scan = end
        for line in chunk.splitlines():
            for pattern, fn in self._watchers:
                m = pattern.search(line)
                if m:
                    fn(m)

    # ---- queries ----
    @property
    def data(self) -> bytes:
        return bytes(self._buf)

    @property
    def text(self) -> str:
        return self._buf.decode("utf-8", "replace")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.text.splitlines()[-lines:])

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """Wait until `pattern` (a regex) appears after the previous match; return the match.

        Raises ExpectTimeout after `timeout` seconds, or at once if the console was closed (the VM
        stopped) without the pattern appearing."""
        rx = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf, self._pos)
                if m:
                    self._pos = m.end()
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise ExpectTimeout(pattern, timeout, self.tail())
                self._cond.wait(min(left, 0.5))

    def contains(self, pattern: str) -> bool:
        return re.search(pattern.encode(), self._buf) is not None
