"""Two vCPUs and ACPI power-off, seen from guest userland.

Marked ``amdv``: they run directly on VT-x/AMD-V hosts and in the AMD-V lane (QEMU TCG,
pykvm/lane) on KVM-PVM hosts, where guest user mode cannot run. Nothing here is timed."""

import re
import subprocess
import sys

import pytest

from pykvm import LinuxVM
from pykvm.assets import USERLAND_MARKER, initramfs, test_kernel

from conftest import assert_no_kernel_warnings

pytestmark = [pytest.mark.amdv, pytest.mark.kvm, pytest.mark.linux]

TIMEOUT = 300
MEMORY = "64M"
# Each CPU's cumulative user+system ticks from /proc/stat, one "cpuN user+sys" line per CPU.
CPU_TICKS = "awk '/^cpu[0-9]/ {print $1, $2 + $4}' /proc/stat"


def ticks(output: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(cpu\d+) (\d+)$", output, re.M)}


def test_userland_sees_two_cpus_and_keeps_both_busy(tmp_path):
    log = open(tmp_path / "console.log", "wb")
    with LinuxVM(test_kernel().bzimage, initrd=initramfs(), memory=MEMORY, cpus=2) as vm:
        vm.console.tee_file(log)
        vm.start(timeout=6 * TIMEOUT)
        vm.console.expect(USERLAND_MARKER, timeout=TIMEOUT)
        assert_no_kernel_warnings(vm.console.text)
        assert vm.shell("nproc", timeout=TIMEOUT).output.strip() == "2"
        assert vm.shell("grep -c ^processor /proc/cpuinfo", timeout=TIMEOUT).output.strip() == "2"
        before = ticks(vm.shell(CPU_TICKS, timeout=TIMEOUT).output)
        # Two shell loops at once, each pinned to one CPU where taskset exists: both must finish,
        # and both CPUs must have spent time on them.
        busy = ("i=0; while [ $i -lt 4000 ]; do i=$((i + 1)); done; echo loop$1-$i")
        pin = "taskset -c {cpu} " if vm.shell("command -v taskset", timeout=TIMEOUT).status == 0 else ""
        r = vm.shell(" ".join(f"{pin.format(cpu=c)}sh -c '{busy}' x {c} &" for c in (0, 1))
                     + " wait", timeout=6 * TIMEOUT)
        assert sorted(re.findall(r"loop\d-4000", r.output)) == ["loop0-4000", "loop1-4000"], r
        after = ticks(vm.shell(CPU_TICKS, timeout=TIMEOUT).output)
        assert set(after) == {"cpu0", "cpu1"}
        assert all(after[c] > before[c] for c in ("cpu0", "cpu1")), (before, after)
        stop = vm.poweroff(timeout=TIMEOUT)
    log.close()
    # ACPI power-off: the kernel announced it, then wrote SLP_TYP(S5)|SLP_EN to PM1a_CNT.
    assert stop.reason == "poweroff" and stop.status == 0 and "ACPI" in stop.message, stop
    assert "reboot: Power down" in vm.console.text


def test_cli_poweroff_through_acpi_ends_with_status_0_on_two_cpus(tmp_path):
    log = tmp_path / "console.log"
    p = subprocess.run(
        [sys.executable, "-m", "pykvm.cli", "boot", str(test_kernel().bzimage), "--initrd",
         str(initramfs()), "--append", "pykvm.poweroff", "--cpus", "2", "--memory", MEMORY,
         "--timeout", str(3 * TIMEOUT), "--console", str(log)],
        capture_output=True, text=True, timeout=3 * TIMEOUT + 120, stdin=subprocess.DEVNULL)
    text = log.read_text(errors="replace")
    assert USERLAND_MARKER in text, text[-2000:]
    assert p.returncode == 0, p.stderr + text[-2000:]
    assert "2 vCPUs, ACPI" in p.stderr
    assert "smp: Brought up 1 node, 2 CPUs" in text
    assert "reboot: Power down" in text
    assert "stopped: poweroff: the guest powered off through ACPI" in p.stderr, p.stderr
