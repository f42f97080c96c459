"""The user's terminal as the guest's serial console.

The terminal goes into raw mode so every key reaches the guest as typed (Ctrl-C included: it is the
guest's to handle). An escape prefix, Ctrl-A as in QEMU and minicom, talks to pykvm instead:

    Ctrl-A x    quit (stop the VM)
    Ctrl-A h    help
    Ctrl-A s    show statistics
    Ctrl-A a    send a literal Ctrl-A
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import tty
from typing import Callable

from ..workers import start_worker

CTRL_A = 0x01

HELP = (b"\r\n[pykvm] Ctrl-A x: quit   Ctrl-A s: statistics   Ctrl-A a: send Ctrl-A   "
        b"Ctrl-A h: this help\r\n")


class Terminal:
    """Reads keys from `fd` (stdin) in a thread and sends them to `feed(bytes)`.

    `on_quit()` is called for Ctrl-A x, `on_stats() -> str` for Ctrl-A s."""

    def __init__(self, feed: Callable[[bytes], None], on_quit: Callable[[], None],
                 on_stats: Callable[[], str] | None = None, fd: int | None = None,
                 on_error: Callable[[str, BaseException], None] | None = None):
        """on_error(thread name, exception): if reading the terminal fails (pykvm/workers.py);
        pykvm boot passes Machine.worker_failed, so the guest stops rather than goes deaf."""
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.on_error = on_error
        self.feed = feed
        self.on_quit = on_quit
        self.on_stats = on_stats
        self._saved = None
        self._stop_r, self._stop_w = os.pipe()
        self._pipe_lock = threading.Lock()   # whoever is last closes the stop pipe, once
        self._pipe_open = True
        self._thread: threading.Thread | None = None
        self._escape = False

    def __enter__(self) -> "Terminal":
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        self._thread = start_worker("pykvm-terminal", self._loop, self.on_error)
        return self

    def __exit__(self, *exc) -> None:
        with self._pipe_lock:
            if self._pipe_open:
                os.write(self._stop_w, b"x")
        if self._thread:
            self._thread.join(timeout=1)
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        # A reader still inside feed() (a guest that does not take input) finds the stop byte
        # when it returns and closes the pipe itself: closed here, its select() would meet a
        # closed descriptor, or one the process has since reused for another file.
        if self._thread is None or not self._thread.is_alive():
            self._close_stop_pipe()

    def _close_stop_pipe(self) -> None:
        with self._pipe_lock:
            if self._pipe_open:
                self._pipe_open = False
                os.close(self._stop_r)
                os.close(self._stop_w)

    def _say(self, msg: bytes) -> None:
        os.write(sys.stdout.fileno(), msg)

    def handle(self, data: bytes) -> None:
        """Process typed bytes: escapes go to pykvm, the rest to the guest."""
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b in (ord("x"), ord("X")):
                    self.on_quit()
                elif b in (ord("h"), ord("H"), ord("?")):
                    self._say(HELP)
                elif b in (ord("s"), ord("S")) and self.on_stats:
                    self._say(b"\r\n[pykvm] " + self.on_stats().replace("\n", "\r\n").encode() + b"\r\n")
                elif b in (ord("a"), CTRL_A):
                    out.append(CTRL_A)
            elif b == CTRL_A:
                self._escape = True
            else:
                out.append(b)
        if out:
            self.feed(bytes(out))

    def _loop(self) -> None:
        try:
            self._read_keys()
        finally:
            self._close_stop_pipe()

    def _read_keys(self) -> None:
        while True:
            r, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in r:
                return
            try:
                data = os.read(self.fd, 256)
            except OSError:
                return
            if not data:       # stdin closed: nothing more to type
                return
            self.handle(data)
