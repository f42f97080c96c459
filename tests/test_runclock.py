"""RunClock (pykvm/runclock.py): `--timeout` counts the time the guest was let run, not the time a
debugger held it. A hand-driven clock, so nothing here depends on how fast the machine is."""

import threading

from pykvm.runclock import RunClock, RunDeadline


class HandClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_held_spans_do_not_count():
    t = HandClock()
    c = RunClock(t)
    t.now += 2
    assert c.elapsed() == 2
    c.hold()
    t.now += 600                        # ten minutes in gdb
    assert c.elapsed() == 2 and c.remaining(5) is None
    c.release()
    t.now += 1
    assert c.elapsed() == 3 and c.remaining(5) == 2
    c.hold()
    c.hold()                            # holding twice is holding once
    t.now += 50
    c.release()
    c.release()
    assert c.elapsed() == 3


def test_restart_zeroes_but_keeps_a_hold():
    # `--gdb-wait` holds the vCPUs before Machine.run() restarts the clock: still held after.
    t = HandClock()
    c = RunClock(t)
    t.now += 7
    c.hold()
    c.restart()
    t.now += 30
    assert c.held and c.elapsed() == 0
    c.release()
    t.now += 1
    assert c.elapsed() == 1
    c.restart()
    assert not c.held and c.elapsed() == 0


def test_deadline_fires_once_running_time_is_spent():
    c = RunClock()
    fired = threading.Event()
    c.hold()
    d = RunDeadline(c, 0, fired.set)   # zero seconds of running: due as soon as it runs
    d.start()
    assert c.remaining(0) is None      # held: nothing can elapse, the thread sleeps on the clock
    c.release()
    assert fired.wait(60)
    d.cancel()


def test_cancelled_deadline_never_fires():
    c = RunClock()
    fired = threading.Event()
    d = RunDeadline(c, 3600, fired.set)
    d.start()
    d.cancel()
    d._thread.join(60)
    assert not d._thread.is_alive() and not fired.is_set()
