"""VMM threads that never die silently.

A VMM has threads besides the vCPU's: the ioeventfd thread that serves virtqueue kicks, virtio-net's
receive thread, the Python PIT's timer, the watchdog and profiler that kick the vCPU. If one of them
dies on an exception, the guest waits for an answer that never comes - a hung guest and, with
Python's default thread hook, one traceback on stderr that nobody connects to it.

`start_worker(name, body, on_error)` runs `body` in a daemon thread; an exception that escapes it
is handed to `on_error(name, exception)` instead. A Machine's `worker_failed` is such a handler: it
counts the failure and stops the VM with reason "error" and a message naming the thread, so
`pykvm boot` ends with exit status 1 and one line, and `LinuxVM.wait()` returns that Stop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

ErrorHandler = Callable[[str, BaseException], None]


def guarded(name: str, body: Callable[[], None], on_error: ErrorHandler | None) -> Callable[[], None]:
    """`body`, with an escaping exception passed to `on_error` (logged with its traceback at
    debug level). Without a handler the exception is logged as an error, never lost."""
    def run() -> None:
        try:
            body()
        except BaseException as e:     # noqa: BLE001 - any failure must reach someone
            import logging             # only now: importing it costs start-up (pykvm/record.py)
            log = logging.getLogger(__name__)
            log.debug("thread %s failed", name, exc_info=True)
            if on_error is None:
                log.error("thread %s failed: %s: %s", name, type(e).__name__, e)
            else:
                on_error(name, e)
    return run


def start_worker(name: str, body: Callable[[], None], on_error: ErrorHandler | None) -> threading.Thread:
    thread = threading.Thread(target=guarded(name, body, on_error), name=name, daemon=True)
    thread.start()
    return thread
