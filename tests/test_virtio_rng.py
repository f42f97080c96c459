"""virtio-rng through the mmio transport and the mock driver."""

from pykvm.irq import RecordingIrqLine
from pykvm.memory import GuestMemory
from pykvm.virtio.mmio import VirtioMmio
from pykvm.virtio.mock import MmioDriver
from pykvm.virtio.rng import VirtioRng


def setup(**kw):
    mem = GuestMemory.for_test(256 * 1024)
    dev = VirtioRng(**kw)
    t = VirtioMmio(dev, mem, RecordingIrqLine())
    drv = MmioDriver(t, mem)
    drv.init()
    return mem, dev, drv


def test_fills_buffers_with_random_bytes():
    mem, dev, drv = setup()
    q = drv.queues[0]
    a = q.add_chain([], [64])
    b = q.add_chain([], [16, 16], indirect=True)
    drv.kick(0)
    assert q.take_used() == [(a, 64), (b, 32)]
    assert q.written(a) != b"\xaa" * 64 and len(set(q.written(a))) > 8
    assert q.written(b)[:16] != q.written(b)[16:]
    assert dev.bytes_given == 96


def test_large_buffer_is_capped():
    mem, dev, drv = setup(max_request=100, source=lambda n: b"\x07" * n)
    q = drv.queues[0]
    h = q.add_chain([], [1000])
    drv.kick(0)
    assert q.take_used() == [(h, 100)]
    assert q.written(h, 101) == b"\x07" * 100 + b"\xaa"


def test_buffer_outside_ram_comes_back_empty():
    mem, dev, drv = setup()
    q = drv.queues[0]
    h = q.add_segments([(mem.size - 8, 16, True)])
    drv.kick(0)
    assert q.take_used() == [(h, 0)]
    assert dev.queue_errors == 1
