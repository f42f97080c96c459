"""VMM threads never die silently: an exception in the ioeventfd, virtio-net receive or timer
thread stops the VM with reason "error" and a message naming the thread (pykvm/workers.py)."""

import logging
import os
import threading

from conftest import needs_kvm
from pykvm.workers import guarded, start_worker
from pykvm.x86 import layout


class BrokenDisk:
    """A block backend with a bug: every read raises something that is not a DiskError (a
    DiskError would be the guest's IOERR; this is the VMM's own failure)."""

    size = 1 << 20
    readonly = False

    def read(self, offset, n):
        raise RuntimeError("backend bug")

    def readinto(self, offset, buffers):
        raise RuntimeError("backend bug")

    def write(self, offset, data):
        raise RuntimeError("backend bug")

    def flush(self):
        pass


@needs_kvm
def test_ioeventfd_thread_failure_stops_the_vm():
    """firmware/virtio_blk.c's first request is served on the ioeventfd thread, which raises: the
    guest would spin on its used ring forever; instead the run ends with the thread's error."""
    from pykvm.testing.firmware import run_firmware
    from pykvm.virtio import VirtioBlk, attach_mmio

    seen = {}

    def setup(m):
        attached = attach_mmio(m, VirtioBlk(BrokenDisk()), 0, ioeventfd=True)
        assert attached.notifier is not None
        seen["m"] = m
        m.on_stop.append(lambda stop: attached.close())

    r = run_firmware("virtio_blk", args=[0, layout.VIRTIO_MMIO_BASE], setup=setup,
                     irqchip="kernel", timeout=120)
    assert r.stop.reason == "error", r.stop
    assert "pykvm-virtio-ioeventfd" in r.stop.message and "RuntimeError: backend bug" in r.stop.message
    assert seen["m"].stats.worker_errors["pykvm-virtio-ioeventfd"] == 1
    assert "virtio_blk: ready" in r.text


def test_virtio_net_receive_thread_failure_is_reported():
    """The receive thread calls the backend; a backend that raises reaches on_worker_error."""
    from test_virtio_net import FakeBackend, setup

    class Exploding(FakeBackend):
        armed = False

        def recv(self):
            if self.armed:
                raise OSError(5, "tap went away")
            return super().recv()

    dev, drv, backend, feats, irq = setup(Exploding())     # the mock driver set it up
    backend.armed = True
    assert dev.active
    failed = threading.Event()
    errors = []
    dev.on_worker_error = lambda name, e: (errors.append((name, e)), failed.set())
    dev.start()
    try:
        backend.inject(b"\0" * 60)            # the backend's fd becomes readable
        assert failed.wait(30), "the receive thread's failure never reached on_worker_error"
    finally:
        dev.close()
    (name, e), = errors
    assert name == "pykvm-virtio-net-rx" and isinstance(e, OSError)


def test_guarded_without_a_handler_logs_an_error(caplog):
    caplog.set_level(logging.ERROR, logger="pykvm.workers")
    guarded("pykvm-test", lambda: 1 / 0, None)()
    assert "pykvm-test failed: ZeroDivisionError" in caplog.text


def test_start_worker_hands_the_exception_over():
    got = []
    done = threading.Event()
    t = start_worker("pykvm-test", lambda: os.close(-1), lambda n, e: (got.append((n, e)), done.set()))
    t.join(30)
    assert done.is_set() and got[0][0] == "pykvm-test" and isinstance(got[0][1], OSError)


@needs_kvm
def test_pit_timer_thread_failure_stops_the_vm():
    """irqchip="user": the Python PIT's deadline thread kicks the vCPU; if the kick raises, the
    VM stops with the error instead of losing every later timer interrupt."""
    from pykvm.machine import Machine

    with Machine(16 << 20, irqchip="user") as m:
        timer = m.userirq._timer

        def bad_kick():
            raise RuntimeError("kick failed")
        timer._kick = bad_kick
        timer.arm(0.0)                          # due at once: the thread kicks, and raises
        timer._thread.join(30)
        assert m._stop is not None and m._stop.reason == "error"
        assert "pykvm-pit-timer" in m._stop.message and m.stats.worker_errors["pykvm-pit-timer"] == 1


def test_terminal_reader_failure_is_reported():
    """Typed input goes to feed(); if that raises, on_error hears of it (pykvm boot: the VM stops
    with the error instead of ignoring the keyboard from then on)."""
    from pykvm.host.terminal import Terminal

    r, w = os.pipe()
    errors, failed = [], threading.Event()

    def feed(data):
        raise RuntimeError("guest input queue gone")

    term = Terminal(feed, lambda: None, fd=r,
                    on_error=lambda name, e: (errors.append((name, e)), failed.set()))
    with term:
        os.write(w, b"x")
        assert failed.wait(30)
    os.close(r)
    os.close(w)
    (name, e), = errors
    assert name == "pykvm-terminal" and "guest input queue gone" in str(e)


def test_terminal_reader_busy_at_exit_ends_cleanly():
    """A reader still inside feed() when the terminal closes (a guest slow to take input) ends
    when feed() returns, with no error: its stop pipe was not closed under it."""
    from pykvm.host.terminal import Terminal

    r, w = os.pipe()
    errors, entered, release = [], threading.Event(), threading.Event()

    def feed(data):
        entered.set()
        release.wait(30)

    term = Terminal(feed, lambda: None, fd=r, on_error=lambda name, e: errors.append((name, e)))
    with term:
        os.write(w, b"x")
        assert entered.wait(30)
    # __exit__ gave up waiting (1 s) with the reader still in feed()
    thread = term._thread
    assert thread.is_alive()
    release.set()
    thread.join(30)
    assert not thread.is_alive() and errors == []
    os.close(r)
    os.close(w)
