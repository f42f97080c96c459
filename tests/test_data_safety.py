"""Guest data reaches the disk: FLUSH and FLUSH CACHE end in fsync(2) on the image, a disabled
write cache makes every write synchronous, closing a VM (LinuxVM.close, Ctrl-C, SIGTERM) flushes
and closes its disks, and a VMM killed with SIGKILL right after a guest's flush leaves the data
in the image.

fsync is observed by wrapping os.fsync (DiskImage calls it through the module), recording which
file each call was for."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import default_sigint, needs_kvm
from pykvm.bus import Bus
from pykvm.devices.ide import AtaDrive, IdeChannel
from pykvm.devices.ide.ata import DRQ, ERR
from pykvm.host.disk import DiskImage
from pykvm.irq import RecordingIrqLine
from pykvm.virtio import blk as B

SECTOR = 512
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fsyncs(monkeypatch):
    """The files os.fsync was called on, in order (as /proc/self/fd paths resolve them)."""
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * SECTOR))
    return path


# ---- virtio-blk ----

def test_virtio_blk_flush_fsyncs_the_image(image, fsyncs):
    from test_virtio_blk import hdr, setup, submit
    with DiskImage(image) as disk:
        dev, drv, q, feats, irq = setup(disk)
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_OUT, 3), b"\x5a" * SECTOR], [1])
        assert q.written(head, 1) == b"\0"
        assert fsyncs == []                               # a write alone is not a flush
        head, n = submit(drv, q, [hdr(B.VIRTIO_BLK_T_FLUSH)], [1])
        assert q.written(head, 1) == b"\0"                # VIRTIO_BLK_S_OK only after the fsync
        assert fsyncs == [str(image)]
    assert image.read_bytes()[3 * SECTOR:4 * SECTOR] == b"\x5a" * SECTOR


# ---- IDE ----

def _ide(disk):
    drive = AtaDrive(disk)
    pio = Bus("pio")
    IdeChannel(RecordingIrqLine(), drive).register_on(pio, (0x1F0, 0x3F6), "primary")
    return pio, drive


def _write_sectors(pio, lba, payload):
    pio.write(0x1F2, 1, len(payload) // SECTOR)
    pio.write(0x1F3, 1, lba & 0xFF)
    pio.write(0x1F4, 1, 0)
    pio.write(0x1F5, 1, 0)
    pio.write(0x1F6, 1, 0xE0)
    pio.write(0x1F7, 1, 0x30)                             # WRITE SECTORS
    for i in range(0, len(payload), 2):
        pio.write(0x1F0, 2, int.from_bytes(payload[i:i + 2], "little"))
    assert not pio.read(0x1F7, 1) & (ERR | DRQ)


def _set_features(pio, sub):
    pio.write(0x1F1, 1, sub)
    pio.write(0x1F7, 1, 0xEF)
    assert not pio.read(0x1F7, 1) & ERR


@pytest.mark.parametrize("command", [0xE7, 0xEA])          # FLUSH CACHE, FLUSH CACHE EXT
def test_ide_flush_cache_fsyncs_the_image(image, fsyncs, command):
    with DiskImage(image) as disk:
        pio, drive = _ide(disk)
        _write_sectors(pio, 5, b"\xa5" * 2 * SECTOR)
        assert fsyncs == []
        pio.write(0x1F7, 1, command)
        assert not pio.read(0x1F7, 1) & ERR
        assert fsyncs == [str(image)]


def test_ide_write_cache_disabled_makes_writes_synchronous(image, fsyncs):
    """SET FEATURES 82h: each write is on stable storage before the drive reports it done;
    02h turns the cache back on (writes then wait for a FLUSH CACHE)."""
    with DiskImage(image) as disk:
        pio, drive = _ide(disk)
        _set_features(pio, 0x82)
        assert drive.identify()[85 * 2] & 0x20 == 0          # IDENTIFY word 85 bit 5: cache off
        _write_sectors(pio, 1, b"\x11" * 3 * SECTOR)          # one DRQ block per sector
        assert fsyncs == [str(image)] * 3
        _set_features(pio, 0x02)
        assert drive.identify()[85 * 2] & 0x20
        _write_sectors(pio, 8, b"\x22" * SECTOR)
        assert len(fsyncs) == 3


def test_ide_identify_does_not_name_the_host_file(image):
    with DiskImage(image) as disk:
        ident = AtaDrive(disk).identify()
    assert b"disk.img" not in ident and b"disk" not in bytes(ident).lower().replace(b" ", b"")


# ---- closing a VM flushes its disks ----

def _spinning_kernel(tmp_path):
    """An ELF 'vmlinux' whose entry is `jmp .`: it runs until the VMM stops it."""
    from pykvm.testing.synthetic import make_elf
    path = tmp_path / "vmlinux"
    path.write_bytes(make_elf([(0x1000000, b"\xeb\xfe" + bytes(62), 0x1000)], 0x1000000,
                              banner=b"Linux version 6.1.0-spin (t@t) #1"))
    return path


@needs_kvm
def test_linuxvm_close_flushes_and_closes_the_disk(tmp_path, image, fsyncs):
    from pykvm import LinuxVM
    vm = LinuxVM(_spinning_kernel(tmp_path), disk=image, memory="64M")
    disk = vm.disk
    vm.close()
    assert fsyncs == [str(image)] and disk.fd == -1


WRAPPER = textwrap.dedent("""
    import os, sys
    real = os.fsync
    def fsync(fd):
        print("FSYNC", os.readlink(f"/proc/self/fd/{fd}"), file=sys.stderr, flush=True)
        real(fd)
    os.fsync = fsync
    from pykvm.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@needs_kvm
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_vm_and_flushes_the_disk(tmp_path, image, signum):
    """`pykvm boot` with a guest that never stops: Ctrl-C (SIGINT) or SIGTERM ends it with
    status 130 after the disk was fsynced, and without a traceback."""
    kernel = _spinning_kernel(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", WRAPPER, "boot", str(kernel), str(image),
                          "--console", "none", "--memory", "64M", "--timeout", "300"],
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=REPO,
                         preexec_fn=default_sigint)
    lines = []
    try:
        for line in p.stderr:
            lines.append(line)
            if "booting" in line:
                break
        else:
            pytest.fail("pykvm never said it was booting: " + "".join(lines))
        p.send_signal(signum)
        rest = p.stderr.read()
        status = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    err = "".join(lines) + rest
    assert status == 130, err
    assert "Traceback" not in err
    if signum == signal.SIGTERM:       # (a Ctrl-C just before the run loop ends the command
        assert "stopped: interrupted: SIGTERM" in err     # without a "stopped" line)
    assert f"FSYNC {image}" in err


# ---- SIGKILL right after a guest's flush ----

KILLABLE = textwrap.dedent("""
    import sys, time
    from pykvm.host.disk import DiskImage
    from pykvm.testing.firmware import run_firmware
    from pykvm.virtio import VirtioBlk, attach_mmio
    from pykvm.x86 import layout

    class Marker:
        # The guest writes 2 here once its last write and the FLUSH completed: say so, then
        # block the vCPU thread until the test kills this process.
        def read(self, offset, size):
            return 0
        def write(self, offset, size, value):
            if value == 2:
                print("FLUSHED", flush=True)
                time.sleep(3600)

    path, total = sys.argv[1], int(sys.argv[2])
    disk = DiskImage(path)
    def setup(m):
        attach_mmio(m, VirtioBlk(disk), 0)
        m.add_pio(0x510, 1, Marker(), "marker")
    run_firmware("virtio_blk", args=[1, layout.VIRTIO_MMIO_BASE, total, 64 << 10, 64 << 10, 4,
                                     0x510, 1], setup=setup, irqchip="kernel", timeout=300)
    print("NOT KILLED", flush=True)
""")


def pattern_guest(sector: int) -> bytes:
    """firmware/virtio_blk.c's pattern_guest(s, i) for one sector."""
    return bytes((sector * 7 + i * 13 + 0x5a) & 0xFF for i in range(SECTOR))


@needs_kvm
def test_sigkill_after_guest_flush_keeps_the_data(tmp_path):
    """firmware/virtio_blk.c writes 256 KiB (4 requests of 64 KiB, one notify) and FLUSHes; the
    VMM is SIGKILLed the moment the guest reports the flush done - no close(), no exit handler.
    Every written sector must be in the image."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    total = 256 << 10
    p = subprocess.Popen([sys.executable, "-c", KILLABLE, str(path), str(total)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = p.stdout.readline()
        assert line.strip() == "FLUSHED", line + p.stderr.read()
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
    data = path.read_bytes()
    for sector in range(total // SECTOR):
        assert data[sector * SECTOR:(sector + 1) * SECTOR] == pattern_guest(sector), sector
    assert data[total:] == bytes(len(data) - total)
