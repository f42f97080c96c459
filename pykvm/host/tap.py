"""A tap device: a virtual Ethernet interface on the host whose other end is a file descriptor.

Every frame the host's network stack sends out of the interface can be read from the fd, and every
frame written to the fd arrives at the host as if received on the interface. pykvm's virtio-net
reads and writes frames here.

We open /dev/net/tun with IFF_TAP (Ethernet frames, not IP packets), IFF_NO_PI (no 4-byte packet
information prefix) and IFF_VNET_HDR, and set the header size to 12 (TUNSETVNETHDRSZ): each frame
then carries exactly the `struct virtio_net_hdr_v1` a VIRTIO 1.0 driver uses, so virtio-net passes
frames through unchanged (Documentation/networking/tuntap.rst, include/uapi/linux/if_tun.h).

Creating a tap needs CAP_NET_ADMIN (or an existing persistent tap owned by this user). Bringing it
up and addressing it (`ip link set dev tap0 up`, `ip addr add ...`) is left to the user or the test.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

# The tun driver's ioctls and flags, from <linux/if_tun.h> through the compiled binding.
from pykvm.kvm.headers import (IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, IFNAMSIZ, TUNGETFEATURES,
                               TUNSETIFF, TUNSETVNETHDRSZ)

_IFREQ = struct.Struct("16sH22x")     # struct ifreq: name, then the flags member of the union

VNET_HDR_LEN = 12
MAX_FRAME = 65535 + VNET_HDR_LEN + 14


class TapError(OSError):
    pass


class Tap:
    """A tap interface (name may contain %d for the kernel to number it; `name` after opening is
    the real one). Non-blocking: `recv()` returns None when no frame is waiting."""

    def __init__(self, name: str = "pykvm%d"):
        if len(name.encode()) >= IFNAMSIZ:
            raise ValueError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(e.errno, f"/dev/net/tun: {e.strerror}") from None
        try:
            features = struct.unpack("I", fcntl.ioctl(self.fd, TUNGETFEATURES, b"\0" * 4))[0]
            if not features & IFF_VNET_HDR:
                raise TapError(errno.ENOTSUP, "this kernel's tun lacks IFF_VNET_HDR")
            ifr = fcntl.ioctl(self.fd, TUNSETIFF,
                              _IFREQ.pack(name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            self.name = _IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        except OSError as e:
            os.close(self.fd)
            if isinstance(e, TapError):
                raise
            raise TapError(e.errno, f"creating tap {name!r}: {e.strerror}") from None
        self.tx_dropped = 0

    def fileno(self) -> int:
        return self.fd

    def recv(self) -> bytes | None:
        """One frame, with its 12-byte virtio_net_hdr_v1 in front, or None."""
        try:
            return os.read(self.fd, MAX_FRAME)
        except BlockingIOError:
            return None

    def send(self, frame: bytes) -> None:
        """Write one frame (with its header). A frame the host cannot take is dropped, as a wire
        would drop it (the interface is down, its queue is full)."""
        try:
            os.write(self.fd, frame)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EIO, errno.EINVAL, errno.ENOBUFS):
                raise
            self.tx_dropped += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
