"""Linux boots on pykvm's ACPI machine (pykvm.acpi) and without it (--no-acpi), checked against the
kernel's own console: it finds the tables (with `acpi_force_table_verification`, every checksum is
checked as each table is installed, and a bad one prints "Incorrect checksum"), takes the CPUs,
LAPIC and IOAPIC from the MADT, finds PCI and COM1 through the DSDT, and offers S5 (power-off)."""

import re
import subprocess
import sys

import pytest

from pykvm import LinuxVM

from conftest import KVM_MARKS

pytestmark = [*KVM_MARKS, pytest.mark.linux]

RUN_INIT = r"Run /init as init process"
BOOT_TIMEOUT = 900
MEMORY = "64M"
BAD_ACPI = re.compile(r"Incorrect checksum|ACPI BIOS (Error|Warning)|ACPI Error|ACPI Warning")


def expect_in_order(vm, patterns, timeout=BOOT_TIMEOUT):
    for pattern in patterns:
        vm.console.expect(pattern, timeout=timeout)


def test_test_kernel_finds_the_acpi_tables_and_reaches_init(kernel, rootfs):
    with LinuxVM(kernel.bzimage, initrd=rootfs, memory=MEMORY,
                 append="acpi_force_table_verification") as vm:
        print("command line:", vm.cmdline)
        assert "reboot=" not in str(vm.cmdline)     # Linux's default: the FADT reset register
        vm.start(timeout=BOOT_TIMEOUT)
        expect_in_order(vm, [
            r"Early table checksum verification enabled",
            r"ACPI: RSDP 0x00000000000E0000 000024 \(v02 PYKVM \)",
            r"ACPI: XSDT 0x\w+ \w+ \(v01 PYKVM  PYKVMPC",
            r"ACPI: FACP 0x\w+ 000114 \(v06 PYKVM  PYKVMPC",
            r"ACPI: DSDT 0x\w+ \w+ \(v02 PYKVM  PYKVMPC",
            r"ACPI: FACS 0x\w+ 000040",
            r"ACPI: APIC 0x\w+ \w+ \(v05 PYKVM  PYKVMPC",
            r"ACPI: PM-Timer IO Port: 0x608",
            r"IOAPIC\[0\]: apic_id \d+, version \d+, address 0xfec00000, GSI 0-23",
            r"ACPI: INT_SRC_OVR \(bus 0 bus_irq 9 global_irq 9 high level\)",
            r"ACPI: Using ACPI \(MADT\) for SMP configuration information",
            r"smpboot: Allowing 1 CPUs, 0 hotplug CPUs",
            r"smp: Brought up 1 node, 1 CPU",
            r"ACPI: 1 ACPI AML tables successfully acquired and loaded",
            r"ACPI: PM: \(supports S0 S5\)",
            r"ACPI: Using IOAPIC for interrupt routing",
            r"ACPI: PCI Root Bridge \[PCI0\] \(domain 0000 \[bus 00-ff\]\)",
            r"pnp: PnP ACPI: found 2 devices",
            r"ttyS0 at I/O 0x3f8 \(irq = 4, base_baud = 115200\) is a 16550A",
            RUN_INIT,
        ])
        vm.stop()
        text = vm.console.text
    assert not BAD_ACPI.search(text), BAD_ACPI.search(text).group(0)


def test_no_acpi_keeps_the_mp_table_machine(kernel, rootfs, tmp_path):
    log = tmp_path / "console.log"
    p = subprocess.run(
        [sys.executable, "-m", "pykvm.cli", "boot", str(kernel.bzimage), "--initrd", str(rootfs),
         "--no-acpi", "--until", RUN_INIT, "--timeout", str(BOOT_TIMEOUT), "--console", str(log),
         "--memory", MEMORY],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60, stdin=subprocess.DEVNULL)
    print(p.stderr)
    assert p.returncode == 0, p.stderr
    assert "1 vCPU, no ACPI (MP table)" in p.stderr
    assert "reboot=k" in p.stderr and "acpi=off" in p.stderr
    text = log.read_text(errors="replace")
    assert "ACPI: RSDP" not in text and "PNP0A03" not in text
    assert re.search(r"found SMP MP-table at \[mem 0x0009fc00-0x0009fc0f\]", text)
    assert re.search(r"Intel MultiProcessor Specification v1\.4", text)
    assert RUN_INIT in text
