"""The test kernel on pykvm's Python PC platform: the i8259/i8254 in Python, and an IDE disk.

Boots stop at the kernel's "Run ... as init process" line (no guest userland on KVM-PVM hosts).
"""

import shutil

import pytest

from pykvm.assets import disk_image, initramfs
from pykvm.linux import LinuxVM

from conftest import KVM_MARKS, assert_clean_ext4, boot_expecting

pytestmark = [*KVM_MARKS, pytest.mark.linux]

BOOT_TIMEOUT = 900
MEMORY = "64M"
RUN_INIT = r"Run /\S+ as init process"
IRQ0_VECTOR = 0x30      # Linux programs the master 8259 to vectors 0x30-0x37 (ISA_IRQ_VECTOR)


def test_python_pit_and_pic_drive_the_kernel_timer(kernel):
    # tsc_early_khz=0: let the kernel measure time against our PIT instead of being told the TSC
    # frequency, so the timer-dependent calibration really runs on the Python models.
    with LinuxVM(kernel.bzimage, initrd=initramfs(), memory=MEMORY, irqchip="user",
                 append="tsc_early_khz=0") as vm:
        assert "nolapic" in str(vm.cmdline)
        # The delay loop is calibrated by counting jiffies, i.e. IRQ 0 from the Python PIT.
        stats = boot_expecting(vm, [r"Calibrating delay loop\.\.\. \d+\.\d+ BogoMIPS",
                                    r"clocksource: Switched to clocksource",
                                    r"Run /init as init process"], BOOT_TIMEOUT)
    timer_irqs = stats["interrupts_injected"].get(IRQ0_VECTOR, 0)
    print("interrupts injected by vector:", stats["interrupts_injected"])
    # HZ=100 in the test kernel: a boot of tens of seconds takes hundreds of ticks at least.
    assert timer_irqs > 100
    assert vm.machine.userirq.pic.spurious == 0


def test_ext4_root_on_ide(kernel, tmp_path):
    disk = tmp_path / "root.ext4"
    shutil.copyfile(disk_image(), disk)
    with LinuxVM(kernel.bzimage, disk=disk, disk_bus="ide", append="rw", memory=MEMORY) as vm:
        assert "root=/dev/sda" in str(vm.cmdline)
        boot_expecting(vm, [r"ata_piix", r"ATA-\d+: PYKVM HARDDISK",
                            r"EXT4-fs \(sda\): mounted filesystem", RUN_INIT], BOOT_TIMEOUT)
    assert_clean_ext4(disk)
