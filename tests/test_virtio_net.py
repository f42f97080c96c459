"""virtio-net against a fake backend; a real tap round trip when root with /dev/net/tun."""

import os
import select
import socket
import subprocess
import threading
import time
from collections import deque

import pytest

from pykvm.irq import RecordingIrqLine
from pykvm.memory import GuestMemory
from pykvm.virtio import net as N
from pykvm.virtio.mmio import VirtioMmio
from pykvm.virtio.mock import MmioDriver

HDR = bytes(12)


class FakeBackend:
    """Frames in a deque; the fd (a pipe) is readable while any are waiting."""

    def __init__(self):
        self.inbox = deque()
        self.sent = []
        self.r, self.w = os.pipe()
        self.lock = threading.Lock()

    def inject(self, frame):
        with self.lock:
            self.inbox.append(frame)
            os.write(self.w, b"x")

    def recv(self):
        with self.lock:
            if not self.inbox:
                return None
            os.read(self.r, 1)
            return self.inbox.popleft()

    def send(self, frame):
        self.sent.append(frame)

    def fileno(self):
        return self.r


def setup(backend=None, mac="52:54:00:12:34:56"):
    mem = GuestMemory.for_test(2 << 20)
    backend = backend or FakeBackend()
    dev = N.VirtioNet(backend, mac=mac)
    irq = RecordingIrqLine()
    t = VirtioMmio(dev, mem, irq)
    drv = MmioDriver(t, mem)
    feats = drv.init()
    return dev, drv, backend, feats, irq


def frame(payload=b"hello", dst=b"\xff" * 6, src=b"\x02" * 6):
    return dst + src + b"\x08\x00" + payload


def test_config_mac_and_link():
    dev, drv, be, feats, irq = setup()
    assert feats & N.VIRTIO_NET_F_MAC and feats & N.VIRTIO_NET_F_STATUS
    assert bytes(drv.config(i, 1) for i in range(6)) == bytes.fromhex("525400123456")
    assert drv.config(6, 2) == N.VIRTIO_NET_S_LINK_UP
    dev.set_link(False)
    assert drv.config(6, 2) == 0
    assert drv.ack_interrupt() == 2


def test_transmit_passes_header_and_frame():
    dev, drv, be, feats, irq = setup()
    tx = drv.queues[1]
    h = tx.add_chain([HDR, frame()], [])
    drv.kick(1)
    assert be.sent == [HDR + frame()]
    assert tx.take_used() == [(h, 0)] and irq.level
    tx.add_chain([b"tiny"], [])                # shorter than the header: a counted error
    drv.kick(1)
    assert len(be.sent) == 1 and dev.errors["transmit"] == 1


def test_receive_waits_for_buffers():
    dev, drv, be, feats, irq = setup()
    rx = drv.queues[0]
    be.inject(HDR + frame(b"one"))
    be.inject(HDR + frame(b"two"))
    assert dev.poll_rx() == 0 and dev.rx_waiting
    a = rx.add_chain([], [1526])
    drv.kick(0)                                 # posting buffers delivers the waiting frame
    used = rx.take_used()
    assert used == [(a, 12 + 17)]
    got = rx.written(a, used[0][1])
    assert got[10:12] == b"\x01\x00"            # num_buffers = 1
    assert got[12:] == frame(b"one")
    b = rx.add_chain([], [1526])
    drv.kick(0)
    assert rx.take_used() == [(b, 29)] and rx.written(b, 29)[12:] == frame(b"two")
    assert dev.rx_frames == 2


def test_oversized_and_link_down_frames_are_dropped():
    dev, drv, be, feats, irq = setup()
    rx = drv.queues[0]
    a = rx.add_chain([], [100])
    be.inject(HDR + frame(b"x" * 200))          # does not fit: dropped, buffer kept
    be.inject(HDR + frame(b"ok"))
    assert dev.poll_rx() == 1
    assert rx.take_used() == [(a, 28)]
    assert dev.rx_dropped == 1
    dev.set_link(False)
    rx.add_chain([], [100])
    be.inject(HDR + frame(b"down"))
    assert dev.poll_rx() == 0 and dev.rx_dropped == 2


def test_receive_thread():
    dev, drv, be, feats, irq = setup()
    rx = drv.queues[0]
    dev.start()
    try:
        for i in range(5):
            be.inject(HDR + frame(bytes([i]) * 10))
        time.sleep(0.2)
        assert rx.take_used() == []             # no buffers yet
        with dev.lock:                          # the vCPU side: post buffers and kick
            heads = [rx.add_chain([], [1526]) for _ in range(8)]
            drv.kick(0)
        deadline = time.time() + 5
        got = []
        while len(got) < 5 and time.time() < deadline:
            with dev.lock:
                got += rx.take_used()
            time.sleep(0.01)
        assert [h for h, _ in got] == heads[:5]
        assert [rx.written(h, n)[12 + 14] for h, n in got] == list(range(5))
    finally:
        dev.stop()
        dev.close()


def tap_unusable_reason():
    if os.geteuid() != 0:
        return "creating a tap needs root (CAP_NET_ADMIN)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    from pykvm.host.tap import Tap, TapError
    try:
        Tap("pykvmprobe%d").close()
    except TapError as e:
        return f"cannot create a tap here: {e}"
    return None


@pytest.mark.skipif(tap_unusable_reason() is not None, reason=tap_unusable_reason() or "")
def test_tap_round_trip():
    from pykvm.host.tap import Tap
    with Tap("pykvmt%d") as tap:
        subprocess.run(["sysctl", "-q", f"net.ipv6.conf.{tap.name}.disable_ipv6=1"],
                       check=False, capture_output=True)
        subprocess.run(["ip", "link", "set", "dev", tap.name, "up"], check=True)
        dev, drv, _, feats, irq = setup(backend=tap)
        # guest -> host: the frame comes out of the interface, seen by a packet socket.
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        s.bind((tap.name, 0))
        s.settimeout(5)
        tx = drv.queues[1]
        out = frame(b"from the guest".ljust(46, b"."), src=dev.mac)[:12] + b"\x88\xb5" + \
            b"from the guest".ljust(46, b".")
        tx.add_chain([HDR, out], [])
        drv.kick(1)
        assert s.recv(2000) == out
        # host -> guest: a frame sent on the interface arrives in a receive buffer.
        # host -> guest: a frame sent on the interface arrives in a receive buffer. The host may
        # send its own frames (IPv6 neighbour discovery) first; look for ours.
        rx = drv.queues[0]
        back = dev.mac + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"to the guest".ljust(46, b"!")
        s.send(back)
        seen = []
        deadline = time.time() + 5
        while back not in seen and time.time() < deadline:
            rx.add_chain([], [1526])
            drv.kick(0)
            select.select([tap.fileno()], [], [], 0.5)
            dev.poll_rx()
            seen += [rx.written(h, n)[12:] for h, n in rx.take_used()]
        assert back in seen
        s.close()
        dev.close()
