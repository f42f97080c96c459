"""virtio-console: output, input fed from another thread, emergency write."""

import threading

from pykvm.irq import RecordingIrqLine
from pykvm.memory import GuestMemory
from pykvm.virtio import mmio as R
from pykvm.virtio.console import VIRTIO_CONSOLE_F_EMERG_WRITE, VirtioConsole
from pykvm.virtio.mmio import VirtioMmio
from pykvm.virtio.mock import MmioDriver


def setup(**kw):
    mem = GuestMemory.for_test(1 << 20)
    out = []
    dev = VirtioConsole(out.append, **kw)
    irq = RecordingIrqLine()
    t = VirtioMmio(dev, mem, irq)
    drv = MmioDriver(t, mem)
    feats = drv.init()
    return dev, drv, out, feats, irq


def test_output():
    dev, drv, out, feats, irq = setup()
    tx = drv.queues[1]
    h = tx.add_chain([b"Linux version ", b"6.1\n"], [])
    drv.kick(1)
    assert out == [b"Linux version 6.1\n"]
    assert tx.take_used() == [(h, 0)]
    assert irq.level


def test_input_waits_for_buffers_and_splits():
    dev, drv, out, feats, irq = setup()
    rx = drv.queues[0]
    dev.feed(b"hello ")
    dev.feed(b"world")
    assert rx.take_used() == []
    a = rx.add_chain([], [4])
    b = rx.add_chain([], [64])
    drv.kick(0)
    assert rx.take_used() == [(a, 4), (b, 7)]
    assert rx.written(a) == b"hell" and rx.written(b, 7) == b"o world"
    c = rx.add_chain([], [8])
    drv.kick(0)
    assert rx.take_used() == []        # nothing pending: the buffer stays with the device
    dev.feed(b"!")
    assert rx.take_used() == [(c, 1)] and rx.written(c, 1) == b"!"


def test_feed_from_threads():
    dev, drv, out, feats, irq = setup()
    rx = drv.queues[0]
    heads = [rx.add_chain([], [3]) for _ in range(100)]
    drv.kick(0)
    threads = [threading.Thread(target=lambda i=i: [dev.feed(bytes([65 + i])) for _ in range(10)])
               for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    used = rx.take_used()
    data = b"".join(rx.written(h, n) for h, n in used)
    assert sorted(data) == sorted(b"".join(bytes([65 + i]) * 10 for i in range(10)))
    assert [h for h, _ in used] == heads[:len(used)]


def test_emergency_write_and_overflow():
    dev, drv, out, feats, irq = setup(max_pending=4)
    assert feats & VIRTIO_CONSOLE_F_EMERG_WRITE
    drv.w(R.CONFIG + 8, ord("!"))
    assert out == [b"!"]
    dev.feed(b"abcdef")
    assert dev.dropped_input == 2
