"""Fuzzing virtio-net, virtio-console and virtio-rng through the mmio transport and the mock
driver: random chains (sizes, splits, buffers outside RAM, wrong directions), random input from
the host side, checked against plain models of what each device must do (VIRTIO 1.2 5.1, 5.3,
5.4) - not against the devices' own code - plus the transport invariants."""

from collections import deque

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.irq import RecordingIrqLine
from pykvm.memory import GuestMemory
from pykvm.virtio import net as N
from pykvm.virtio.console import MAX_TX_CHAIN, VirtioConsole
from pykvm.virtio.mmio import VirtioMmio
from pykvm.virtio.mock import MmioDriver
from pykvm.virtio.rng import VirtioRng

from virtio_invariants import assert_transport_sound

RAM = 1 << 20
OUTSIDE = RAM + 0x10000          # a guest-physical address with no RAM behind it
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bring_up(dev):
    mem = GuestMemory.for_test(RAM)
    irq = RecordingIrqLine()
    t = VirtioMmio(dev, mem, irq)
    drv = MmioDriver(t, mem)
    drv.init()
    return mem, t, drv, irq


pieces = st.lists(st.binary(min_size=0, max_size=300), min_size=0, max_size=4)
sizes = st.lists(st.integers(0, 700), min_size=0, max_size=4)


# ---- virtio-rng (5.4): every writable buffer filled from the source, up to the cap ----

@FUZZ
@given(chains=st.lists(st.tuples(pieces, sizes, st.booleans(), st.booleans()), max_size=8),
       cap=st.integers(1, 2000))
def test_fuzz_virtio_rng(chains, cap):
    """Each request's writable buffers get min(their size, the cap) bytes, the next bytes of the
    source, in order; a readable buffer is the guest's mistake (counted) and changes nothing;
    a buffer outside RAM sends the chain back empty."""
    stream = bytearray()

    def source(n):
        chunk = bytes((len(stream) + i) & 0xFF for i in range(n))
        stream.extend(chunk)
        return chunk

    dev = VirtioRng(source=source, max_request=cap)
    mem, t, drv, irq = bring_up(dev)
    q = drv.queues[0]
    given_total = 0
    for readable, writable, indirect, outside in chains:
        if not 0 < len(readable) + len(writable) <= 6:
            continue
        segs = []
        for data in readable:
            addr = drv.alloc.alloc(max(len(data), 1))
            mem.write(addr, data)
            segs.append((addr, len(data), False))
        for n in writable:
            addr = drv.alloc.alloc(max(n, 1))
            mem.fill(addr, n, 0xAA)
            segs.append((addr, n, True))
        if outside and writable:
            segs[-1] = (OUTSIDE, writable[-1], True)
        head = q.add_segments(segs, indirect=indirect)
        start = len(stream)
        drv.kick(0)
        (used_head, n), = q.take_used()
        assert used_head == head
        want = min(sum(writable), cap)
        if outside and writable and want > sum(writable[:-1]):
            assert n == 0                                  # the write reaches the bad buffer
            continue
        assert n == want, (readable, writable, outside, cap)
        got, pos = bytearray(), n
        for addr, ln, w in segs:
            if w and pos:
                got += mem.read(addr, min(ln, pos))
                pos -= min(ln, pos)
        assert bytes(got) == bytes(stream[start:start + n])
        given_total += n
        assert dev.bytes_given == given_total
        assert_transport_sound(t, dev, mem, irq)


# ---- virtio-console (5.3): output is exactly what valid transmit chains held; input is
# delivered in order into posted buffers, bounded by max_pending ----

@FUZZ
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("tx"), pieces, st.booleans()),
    st.tuples(st.just("feed"), st.binary(min_size=0, max_size=200), st.just(False)),
    st.tuples(st.just("rx"), sizes, st.booleans())), max_size=20),
    max_pending=st.integers(1, 400))
def test_fuzz_virtio_console(ops, max_pending):
    out = []
    dev = VirtioConsole(out.append, max_pending=max_pending)
    mem, t, drv, irq = bring_up(dev)
    rx, tx = drv.queues[0], drv.queues[1]
    expected_out = bytearray()
    fed = bytearray()
    delivered = bytearray()
    for kind, arg, flag in ops:
        if kind == "tx":
            if not 0 < len(arg) <= 6:
                continue
            head = tx.add_chain(arg, [], indirect=flag)
            drv.kick(1)
            assert [h for h, _ in tx.take_used()] == [head]
            data = b"".join(arg)
            if len(data) <= MAX_TX_CHAIN:
                expected_out += data
        elif kind == "feed":
            fed += arg
            dev.feed(arg)
        else:
            if not 0 < len(arg) <= 6 or sum(arg) == 0:
                continue
            head = rx.add_chain([], arg, indirect=flag)
            drv.kick(0)
        for h, n in rx.take_used():
            delivered += rx.written(h, n)
        assert b"".join(out) == bytes(expected_out)
        # input: what the guest got, then what waits, is a prefix-preserving part of what was
        # fed, and nothing is lost without being counted as dropped
        assert len(delivered) + dev._pending_len + dev.dropped_input == len(fed)
        assert dev._pending_len <= max_pending
        assert_transport_sound(t, dev, mem, irq)
    if dev.dropped_input == 0:
        assert bytes(delivered) == bytes(fed[:len(delivered)])


# ---- virtio-net (5.1): frames out are exactly valid transmit chains; frames in go whole into
# one buffer each with num_buffers = 1, or are dropped and counted ----

class QueueBackend:
    def __init__(self):
        self.inbox = deque()
        self.sent = []

    def recv(self):
        return self.inbox.popleft() if self.inbox else None

    def send(self, frame):
        self.sent.append(bytes(frame))

    def fileno(self):
        return -1


frames = st.binary(min_size=0, max_size=1600)


@FUZZ
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("tx"), st.lists(frames, min_size=1, max_size=3), st.booleans()),
    st.tuples(st.just("inject"), st.lists(frames, min_size=1, max_size=2), st.just(False)),
    st.tuples(st.just("rx"), st.lists(st.integers(0, 1600), min_size=1, max_size=2),
              st.booleans())), max_size=16))
def test_fuzz_virtio_net(ops):
    backend = QueueBackend()
    dev = N.VirtioNet(backend, mac="52:54:00:00:00:01")
    mem, t, drv, irq = bring_up(dev)
    rx, tx = drv.queues[0], drv.queues[1]
    sent_expected, injected, received = [], [], []
    for kind, arg, flag in ops:
        if kind == "tx":
            head = tx.add_chain(arg, [], indirect=flag)
            drv.kick(1)
            assert [h for h, _ in tx.take_used()] == [head]
            frame = b"".join(arg)
            if N.VNET_HDR_LEN <= len(frame) <= N.MAX_TX_FRAME:
                sent_expected.append(frame)
        elif kind == "inject":
            backend.inbox.extend(arg)
            injected.extend(arg)
            dev.poll_rx()
        else:
            rx.add_chain([], arg, indirect=flag)
            drv.kick(0)
        for h, n in rx.take_used():
            received.append(rx.written(h, n))
        assert backend.sent == sent_expected
        assert_transport_sound(t, dev, mem, irq)
    # Every injected frame was delivered, dropped, or is still waiting (at most one held back
    # plus what the backend still has), in order.
    waiting = (1 if dev.rx_waiting else 0) + len(backend.inbox)
    assert len(received) + dev.rx_dropped + waiting == len(injected)
    pos = 0
    for got in received:
        assert got[N.NUM_BUFFERS_OFFSET:N.VNET_HDR_LEN] == b"\x01\x00"
        while pos < len(injected) and (len(injected[pos]) < N.VNET_HDR_LEN or
                                       _strip(injected[pos]) != _strip(got)):
            pos += 1                                   # a frame dropped on the way
        assert pos < len(injected), "a received frame that was never injected"
        pos += 1


def _strip(frame: bytes) -> bytes:
    """A frame without its num_buffers field (the device fills that in)."""
    return frame[:N.NUM_BUFFERS_OFFSET] + frame[N.VNET_HDR_LEN:]
