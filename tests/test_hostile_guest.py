"""A guest that tries to make the VMM grow: firmware/hostile.c floods a virtio-console and sweeps
unclaimed MMIO. The VMM's resident memory, measured against a small run of the same guest in the
same test, must stay bounded (generous bounds, far below what keeping everything would take)."""

import os

import pytest

from conftest import KVM_MARKS
from pykvm.bus import UNCLAIMED_LOG_MAX
from pykvm.console import ConsoleLog
from pykvm.devices.debugcon import DebugCon
from pykvm.testing.firmware import build, firmware_machine, prepare
from pykvm.virtio import VirtioConsole, attach_mmio
from pykvm.x86 import layout

pytestmark = KVM_MARKS
MiB = 1 << 20


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def run_hostile(args, console=None):
    """Run firmware/hostile.c; return (stop, machine stats dict, RSS at the stop, console)."""
    console = console if console is not None else ConsoleLog()
    seen = {}
    with firmware_machine(16 * MiB, irqchip="kernel") as m:
        m.add_pio(layout.PORT_DEBUG, 1, DebugCon(console.write), "debugcon")
        attach_mmio(m, VirtioConsole(console.write), 0)
        m.add_exit_port()
        prepare(m, build("hostile"), args=args)
        # Measured while the machine (and its guest RAM) still exists, as in the baseline.
        m.on_stop.append(lambda stop: seen.update(rss=rss(), unclaimed=m.mmio.unclaimed,
                                                  log=len(m.mmio.unclaimed_log) + len(m.pio.unclaimed_log),
                                                  other=m.mmio.unclaimed_other + m.pio.unclaimed_other,
                                                  pio=m.pio.unclaimed))
        stop = m.run(timeout=120)
    assert stop.reason == "exit" and stop.status == 0, (stop, console.tail())
    return stop, seen, console


def test_console_flood_keeps_a_bounded_tail_and_the_file_gets_everything(tmp_path):
    log = tmp_path / "console.log"
    run_hostile([0, 1 * MiB])                       # warm up: code, caches, one full buffer
    _, base, _ = run_hostile([0, 1 * MiB])
    with open(log, "wb") as f:
        console = ConsoleLog()
        console.tee_file(f)
        total = 96 * MiB
        _, seen, console = run_hostile([0, total], console)
    growth = seen["rss"] - base["rss"]
    assert growth < 24 * MiB, f"RSS grew {growth >> 20} MiB for a {total >> 20} MiB flood"
    kept = len(console.data)
    assert console.keep <= kept <= console.keep * 5 // 4 + 4096
    assert console.dropped + kept == total + len(b"hostile: done mode 0\n")
    assert console.data.count(b"console flood") > kept // 70
    assert console.text.endswith("hostile: done mode 0\n")
    assert log.stat().st_size == console.dropped + kept     # the file asked for has it all


def test_console_expect_still_works_after_trimming():
    console = ConsoleLog(keep=4096)
    console.write(b"x" * 10000 + b"\nfirst marker\n")
    assert console.expect("first marker").group() == b"first marker"
    console.write(b"y" * 10000 + b"\nsecond marker\n")
    assert console.dropped > 0
    assert console.expect("second marker").group() == b"second marker"
    assert not console.contains("first marker")


def test_unclaimed_mmio_sweep_is_counted_not_logged_per_address():
    _, base, _ = run_hostile([1, 2000])
    n = 40_000
    _, seen, _ = run_hostile([1, n])
    assert seen["unclaimed"] == n
    assert seen["log"] <= UNCLAIMED_LOG_MAX * 2 and seen["other"] >= n - UNCLAIMED_LOG_MAX
    growth = seen["rss"] - base["rss"]
    assert growth < 4 * MiB, f"RSS grew {growth >> 20} MiB for {n} unclaimed addresses"


def run_disk_writer(path, total, *, snapshot):
    """firmware/virtio_blk.c mode 1, writing: `total` bytes in 1 MiB requests, 4 per notify, then
    a FLUSH. Returns the RSS at the stop and the result."""
    from pykvm.host.disk import DiskImage
    from pykvm.testing.firmware import run_firmware
    from pykvm.virtio import VirtioBlk

    seen = {}
    with DiskImage(path, snapshot=snapshot) as disk:
        def setup(m):
            attach_mmio(m, VirtioBlk(disk), 0)
            m.on_stop.append(lambda stop: seen.update(rss=rss()))
        r = run_firmware("virtio_blk", args=[1, layout.VIRTIO_MMIO_BASE, total, MiB, 256 << 10, 4,
                                             0, 1], setup=setup, irqchip="kernel", timeout=120,
                         memory=32 * MiB)
        written = disk.overlay.written if snapshot else None
    assert r.status == 0, r.text
    return seen["rss"], written


def test_snapshot_overlay_does_not_grow_the_vmm(tmp_path):
    """A guest writing 192 MiB to a --snapshot disk: the overlay goes to a sparse temporary file,
    so the VMM's RSS grows by far less than what was written, and the image is untouched."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(256 * MiB)                   # sparse: reading it costs nothing
    run_disk_writer(img, 4 * MiB, snapshot=True)            # warm up
    base, _ = run_disk_writer(img, 4 * MiB, snapshot=True)
    total = 192 * MiB
    after, written = run_disk_writer(img, total, snapshot=True)
    assert written == total // 4096
    growth = after - base
    assert growth < 48 * MiB, f"RSS grew {growth >> 20} MiB for {total >> 20} MiB of guest writes"
    assert os.stat(img).st_blocks == 0          # still all holes: nothing reached the image


class EndlessNet:
    """A host network that always has another frame for the guest and takes every frame the
    guest sends: counts, keeps nothing. `fileno` is always readable (an eventfd kept set)."""

    def __init__(self):
        import os as _os
        self.fd = _os.eventfd(1, _os.EFD_NONBLOCK)
        self.sent = self.sent_bytes = self.recvs = 0

    def recv(self):
        self.recvs += 1
        return bytes(12) + b"\xff" * 1502

    def send(self, frame):
        self.sent += 1
        self.sent_bytes += len(frame)

    def fileno(self):
        return self.fd


def test_virtio_net_flood_both_ways_is_bounded():
    """The guest transmits 16 MiB in 1514-byte frames and never enables its receive queue, while
    the host side always has frames for it: every transmitted frame goes to the backend, no
    frame is read for a queue that cannot take it, the receive thread sleeps instead of
    spinning on the always-readable backend, and the VMM's RSS stays where a short run left it."""
    from pykvm.virtio import VirtioNet

    def run(total):
        backend = EndlessNet()
        seen = {}
        with firmware_machine(16 * MiB, irqchip="kernel") as m:
            console = ConsoleLog()
            m.add_pio(layout.PORT_DEBUG, 1, DebugCon(console.write), "debugcon")
            m.add_exit_port()
            attached = attach_mmio(m, VirtioNet(backend), 0)
            dev, polls = attached.device, []
            real_poll = dev.poll_rx

            def counted_poll():
                polls.append(1)
                return real_poll()
            dev.poll_rx = counted_poll             # what the receive thread calls each wakeup
            attached.start()                       # the receive thread, watching the backend
            prepare(m, build("hostile"), args=[0, total, layout.VIRTIO_MMIO_BASE, 1514, 1])
            m.on_stop.append(lambda stop: seen.update(rss=rss(), polls=len(polls)))
            stop = m.run(timeout=120)
            attached.close()
        assert stop.reason == "exit" and stop.status == 0, (stop, console.tail())
        return backend, seen

    run(1514 * 100)
    _, base = run(1514 * 100)
    total = 1514 * 11_000                          # ~16 MiB
    backend, seen = run(total)
    assert backend.sent == 11_000 and backend.sent_bytes == total
    assert backend.recvs == 0
    # wakeups of the receive thread: a few (activation, the 1 s select timeout), not a spin
    assert seen["polls"] < 50, seen["polls"]
    growth = seen["rss"] - base["rss"]
    assert growth < 8 * MiB, f"RSS grew {growth >> 20} MiB"
