"""Console output from the guest: kept, searched, and copied to wherever the user wants it.

A guest's serial port (or debug port) hands its bytes to `ConsoleLog.write`. The log keeps them all,
tees them to sinks (the terminal, a file), and lets a test suite wait for a line:

    vm.console.expect(r"Run /init as init process", timeout=60)

`expect` searches everything since the last match (like pexpect), so awaiting lines in order works.

What is kept is bounded: the last `keep` bytes (4 MiB by default, far more than a Linux boot log),
because the guest decides how much it prints and a guest printing forever must not make the VMM
grow forever. Older output is dropped from the front (`dropped` counts it); the whole log goes only
where the user asked for it, a file or the terminal (`tee`, `tee_file`), as it arrives.
"""

from __future__ import annotations

import re
import threading
import time
from typing import BinaryIO, Callable


class ExpectTimeout(TimeoutError):
    """The awaited output did not appear in time. Carries the console's tail for the report."""

    def __init__(self, pattern: str, timeout: float, tail: str, stopped: bool = False):
        when = "before the VM stopped" if stopped else f"within {timeout:g} s"
        super().__init__(f"{pattern!r} did not appear {when}; console ended with:\n{tail}")
        self.pattern = pattern
        self.tail = tail


DEFAULT_KEEP = 4 << 20


class ConsoleLog:
    def __init__(self, keep: int = DEFAULT_KEEP) -> None:
        if keep < 4096:
            raise ValueError("a console log keeps at least 4 KiB")
        self.keep = keep
        self._buf = bytearray()
        self._base = 0                      # stream offset of _buf[0]: bytes dropped so far
        self._pos = 0                       # stream offset where the next expect() starts searching
        self._cond = threading.Condition()
        self._sinks: list[Callable[[bytes], object]] = []
        self._watchers: list[tuple[re.Pattern, Callable[[re.Match], None]]] = []
        self._scan = 0                      # stream offset: how far watchers have looked
        self.closed = False

    # ---- input side (devices) ----
    def write(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            # Trim in steps of a quarter of `keep`, so that a byte-at-a-time console does not
            # move the whole buffer on every write.
            if len(self._buf) > self.keep + (self.keep >> 2):
                drop = len(self._buf) - self.keep
                del self._buf[:drop]
                self._base += drop
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

    def tee_file(self, f: BinaryIO, on_error: Callable[[OSError], object] | None = None) -> None:
        """Also write every future byte to file `f`, flushed at once. With `on_error`, a write
        the host refuses (a full disk: ENOSPC) ends the copy and goes to on_error(exc), rather
        than raising out of the UART's register write that produced the byte."""
        failed = False

        def write(data: bytes) -> None:
            nonlocal failed
            if failed:
                return
            try:
                f.write(data)
                f.flush()
            except OSError as e:
                if on_error is None:
                    raise
                failed = True
                on_error(e)
        self._sinks.append(write)

    def on_line(self, pattern: str, fn: Callable[[re.Match], None]) -> None:
        """Call fn(match) when a complete output line matches `pattern` (e.g. "Kernel panic")."""
        self._watchers.append((re.compile(pattern.encode()), fn))

    def _check_watchers(self) -> None:
        with self._cond:
            end = self._buf.rfind(b"\n") + 1
            chunk = bytes(self._buf[max(self._scan - self._base, 0):end])
            self._scan = self._base + end
        for line in chunk.splitlines():
            for pattern, fn in self._watchers:
                m = pattern.search(line)
                if m:
                    fn(m)

    # ---- queries ----
    @property
    def dropped(self) -> int:
        """Bytes of output no longer kept (the oldest), beyond the last `keep`."""
        return self._base

    @property
    def data(self) -> bytes:
        """The kept output: everything, unless more than `keep` bytes came (see `dropped`)."""
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
                start = max(self._pos - self._base, 0)
                if rx.search(self._buf, start):
                    # Match again on a copy: a match on the bytearray would read its groups from
                    # a buffer that trimming shifts later.
                    m = rx.search(bytes(self._buf), start)
                    self._pos = self._base + m.end()
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise ExpectTimeout(pattern, timeout, self.tail(), stopped=self.closed)
                self._cond.wait(min(left, 0.5))

    def contains(self, pattern: str) -> bool:
        return re.search(pattern.encode(), self._buf) is not None
