"""virtio-net, the network card (VIRTIO 1.2 section 5.1), with one receive and one transmit queue.

Every frame on either queue starts with `struct virtio_net_hdr_v1` (5.1.6), 12 bytes with
VIRTIO_F_VERSION_1:

    u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size; le16 csum_start; le16 csum_offset;
    le16 num_buffers;

We offer no checksum or segmentation offloads, so the driver always sends a zero header and we
always give it one; `num_buffers` is 1 on receive (no VIRTIO_NET_F_MRG_RXBUF, 5.1.6.4). The backend
(pykvm.host.tap.Tap, or a fake in tests) speaks the same 12-byte header, so frames pass through.

Configuration space (5.1.4): u8 mac[6]; le16 status (VIRTIO_NET_S_LINK_UP); le16
max_virtqueue_pairs. Features: VIRTIO_NET_F_MAC (the driver uses our MAC) and VIRTIO_NET_F_STATUS
(the link state is real and can change: `set_link()` raises a configuration interrupt).

Transmit happens on the vCPU thread when the driver kicks queue 1. Receive is driven from the
backend's side: `poll_rx()` moves waiting frames into the guest's receive buffers; the VMM calls it
from a poll loop or lets `start()` run a thread that waits on the backend's fd. A frame that
arrives when the guest has posted no buffers waits (one frame; the tap queues the rest in the host
kernel) until the driver kicks queue 0. All queue work happens under `self.lock`, the lock the
transport holds for register accesses, so the receive thread and the vCPU never interleave.
"""

from __future__ import annotations

import os
import select
import struct
import threading
from typing import Protocol

from .device import VIRTIO_ID_NET, VirtioDevice
from ..workers import start_worker
from .queue import ChainError, DescChain

VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MTU = 1 << 3
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_F_CTRL_VQ = 1 << 17
VIRTIO_NET_F_MQ = 1 << 22

VIRTIO_NET_S_LINK_UP = 1

VNET_HDR_LEN = 12
NUM_BUFFERS_OFFSET = 10
RX, TX = 0, 1
QUEUE_SIZE = 256
MAX_TX_FRAME = VNET_HDR_LEN + 65535 + 14   # the largest frame a tap takes, header included


class NetBackend(Protocol):
    """Where frames go (pykvm.host.tap.Tap is one). Frames carry the 12-byte header."""

    def recv(self) -> bytes | None: ...      # non-blocking: one frame or None

    def send(self, frame: bytes) -> None: ...

    def fileno(self) -> int: ...             # readable when recv() has a frame (for start())


def parse_mac(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        return mac
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return bytes(int(p, 16) for p in parts)


def random_mac() -> bytes:
    """A locally administered unicast address (bit 1 of the first byte set, bit 0 clear)."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return bytes(b)


class VirtioNet(VirtioDevice):
    device_id = VIRTIO_ID_NET
    name = "virtio-net"
    # The MAC is the guest's identity: a clone is given a new one after restore (pykvm/snapshot).
    STATE = VirtioDevice.STATE + ("mac", "link_up", "_rx_frame", "rx_frames", "tx_frames",
                                  "rx_dropped")

    def __init__(self, backend: NetBackend, mac: str | bytes | None = None,
                 queue_size: int = QUEUE_SIZE):
        super().__init__([queue_size, queue_size], VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS)
        self.backend = backend
        self.mac = parse_mac(mac) if mac is not None else random_mac()
        self.link_up = True
        self._rx_frame: bytes | None = None     # received from the backend, waiting for a buffer
        self.rx_frames = self.tx_frames = 0
        self.rx_dropped = 0
        self._thread: threading.Thread | None = None
        self._stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def config_bytes(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return self.mac + struct.pack("<HH", status, 1)

    def write_config_bytes(self, offset: int, data: bytes) -> None:
        # Legacy drivers could write the MAC without VIRTIO_NET_F_CTRL_MAC_ADDR; 1.0 ones cannot.
        self.guest_error("config write", f"{len(data)} bytes at {offset:#x}")

    def set_link(self, up: bool) -> None:
        with self.lock:
            if up != self.link_up:
                self.link_up = up
                self.config_changed()

    # ---- transmit: guest -> backend ----
    def process_queue(self, index: int) -> None:
        if index == TX:
            self.drain(TX, self._transmit)
        else:
            self.poll_rx()       # new receive buffers: deliver a waiting frame
            self._wake()         # and let the receive thread watch the backend again

    def _transmit(self, chain: DescChain) -> int:
        n = chain.readable_len
        if n < VNET_HDR_LEN or n > MAX_TX_FRAME:
            self.guest_error("transmit", f"{n}-byte frame")
            return 0
        try:
            frame = chain.read(0, n)
        except ChainError:
            return 0
        self.backend.send(frame)
        self.tx_frames += 1
        return 0

    # ---- receive: backend -> guest ----
    def poll_rx(self) -> int:
        """Move frames from the backend into receive buffers until one side runs dry. Returns
        the number of frames delivered. Safe from any thread."""
        with self.lock:
            q = self.queues[RX]
            if not self.active or not q.ready:
                return 0
            start, delivered = q.next_used, 0
            while True:
                if self._rx_frame is None:
                    self._rx_frame = self.backend.recv()
                    if self._rx_frame is None:
                        break
                frame = self._rx_frame
                if not self.link_up or len(frame) < VNET_HDR_LEN:
                    self._rx_frame = None
                    self.rx_dropped += 1
                    continue
                chain = q.pop()
                if chain is None:
                    break              # keep the frame until the driver posts buffers
                if len(frame) > chain.writable_len:
                    # Our buffers are all alike (Linux posts 1518-byte-plus-header ones without
                    # MRG_RXBUF): a frame that does not fit one will not fit the next either.
                    q.undo_pop()
                    self._rx_frame = None
                    self.rx_dropped += 1
                    continue
                buf = bytearray(frame)
                buf[NUM_BUFFERS_OFFSET:VNET_HDR_LEN] = b"\x01\x00"
                self._rx_frame = None
                try:
                    chain.write(0, buf)
                    q.add_used(chain.head, len(buf))
                    delivered += 1
                    self.rx_frames += 1
                except ChainError:
                    q.add_used(chain.head, 0)
                    self.rx_dropped += 1
            if q.next_used != start:
                self.signal_used(q)
            if q.broken:
                self.needs_reset()
            return delivered

    @property
    def rx_waiting(self) -> bool:
        """A frame is held back until the driver posts receive buffers."""
        return self._rx_frame is not None

    def on_activate(self) -> None:
        self._wake()

    def on_reset(self) -> None:
        self._rx_frame = None

    # ---- the receive thread ----
    def start(self) -> None:
        """Receive in a background thread that waits on the backend's fd."""
        if self._thread is None:
            self._stop = False
            self._thread = start_worker("pykvm-virtio-net-rx", self._rx_loop,
                                        self.on_worker_error)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop = True
            self._wake()
            self._thread.join()
            self._thread = None

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # already awake

    def _rx_loop(self) -> None:
        backend_fd = self.backend.fileno()
        while not self._stop:
            with self.lock:
                # Watch the backend only when a frame could go somewhere; otherwise its fd
                # stays readable and we would spin. That includes a receive queue the driver
                # has not enabled (a guest may never enable it); its first kick wakes us.
                blocked = self.rx_waiting or not self.active or not self.queues[RX].ready
            fds = [self._wake_r] if blocked else [self._wake_r, backend_fd]
            ready, _, _ = select.select(fds, [], [], 1.0)
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            if not self._stop:
                self.poll_rx()

    def close(self) -> None:
        self.stop()
        os.close(self._wake_r)
        os.close(self._wake_w)
