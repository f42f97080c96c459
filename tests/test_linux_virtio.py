"""The test kernel with virtio devices: an ext4 root on /dev/vda, the console on hvc0, virtio-rng.

Each boot stops at the kernel's "Run ... as init process" line (on a KVM-PVM host no guest userland
can run), after the kernel has probed the devices and, for the disk, mounted the root filesystem.
"""

import hashlib
import shutil

import pytest

from pykvm.assets import disk_image
from pykvm.linux import LinuxVM

from conftest import KVM_MARKS, assert_clean_ext4, boot_expecting

pytestmark = [*KVM_MARKS, pytest.mark.linux]

BOOT_TIMEOUT = 900
MEMORY = "64M"     # boot time grows with guest RAM under emulation
RUN_INIT = r"Run /\S+ as init process"


@pytest.fixture
def disk(tmp_path):
    """A private copy of the project's ext4 image (mke2fs -d of the busybox root)."""
    path = tmp_path / "root.ext4"
    shutil.copyfile(disk_image(), path)
    return path


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def boot_to_init(vm, *lines):
    """Boot until each of `lines`, then the kernel's Run /init, has been printed; stop."""
    return boot_expecting(vm, [*lines, RUN_INIT], BOOT_TIMEOUT)


def test_ext4_root_on_virtio_blk_read_write(kernel, disk):
    with LinuxVM(kernel.bzimage, disk=disk, append="rw", memory=MEMORY) as vm:
        assert "root=/dev/vda" in str(vm.cmdline)
        boot_to_init(vm, r"virtio_blk virtio0: \[vda\] \d+ 512-byte logical blocks",
                     r"EXT4-fs \(vda\): mounted filesystem",
                     r"VFS: Mounted root \(ext4 filesystem\) on device 254:0")
    # A read-write mount wrote the superblock (mount count, orphan list, journal): the image must
    # still be a clean, consistent filesystem once pykvm has let go of it.
    assert_clean_ext4(disk)


def test_snapshot_leaves_the_image_untouched(kernel, disk):
    before = sha256(disk)
    with LinuxVM(kernel.bzimage, disk=disk, snapshot=True, append="rw", memory=MEMORY) as vm:
        boot_to_init(vm)
        assert "mounted filesystem" in vm.console.text
    assert sha256(disk) == before


def test_readonly_disk_mounts_read_only(kernel, disk):
    before = sha256(disk)
    with LinuxVM(kernel.bzimage, disk=disk, readonly=True, memory=MEMORY) as vm:
        boot_to_init(vm)
        assert "[vda]" in vm.console.text
    assert sha256(disk) == before


def test_console_on_hvc0_and_virtio_rng(kernel, tmp_path):
    from pykvm.assets import initramfs
    with LinuxVM(kernel.bzimage, initrd=initramfs(), console="hvc0", rng=True, memory=MEMORY) as vm:
        assert "console=hvc0" in str(vm.cmdline)
        boot_to_init(vm)
        text = vm.console.text
    # The kernel console came through the virtio-console (COM1 got nothing after the switch)...
    assert "Run /init as init process" in text
    assert vm.devices.serial.bytes_out == 0
    # ...and the hw_random core picked up the virtio rng and read from it.
    rng = vm.virtio[-1]
    assert rng.name == "virtio-rng"
    assert rng.bytes_given > 0


def test_ext4_root_on_virtio_pci(kernel, disk):
    with LinuxVM(kernel.bzimage, disk=disk, disk_bus="virtio-pci", snapshot=True, memory=MEMORY) as vm:
        assert "virtio_mmio.device" not in str(vm.cmdline)
        boot_to_init(vm, r"pci 0000:00:0\d\.0: \[1af4:1042\] type 00 class 0x018000",
                     r"virtio_blk virtio0: \[vda\]", r"EXT4-fs \(vda\): mounted filesystem")
