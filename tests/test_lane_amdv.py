"""The AMD-V lane's smoke test: real hardware virtualization, and a guest userland on it.

Marked ``amdv``: on a KVM-PVM host these run inside the lane (pykvm/lane), where L1 is AMD-V; on a
VT-x/AMD-V host they run directly. Either way they check the host they actually run on.
"""

import subprocess
import sys

import pytest

from pykvm import LinuxVM, pvm
from pykvm.assets import USERLAND_MARKER, initramfs, test_kernel

from conftest import assert_no_kernel_warnings

pytestmark = [pytest.mark.amdv, pytest.mark.kvm, pytest.mark.linux]

TIMEOUT = 300


def test_pykvm_info_reports_hardware_virtualization():
    p = subprocess.run([sys.executable, "-m", "pykvm.cli", "info"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    kind = [line.split(":", 1)[1].strip() for line in p.stdout.splitlines() if line.startswith("host kind:")]
    assert kind and kind[0] in (pvm.AMD_V, pvm.INTEL_VTX), p.stdout


def test_test_kernel_reaches_a_busybox_shell():
    """The busybox init prints its marker from guest user mode, then its shell runs a command.
    On the way the kernel reported no warning, BUG or oops - but for the XSAVE one QEMU's TCG
    causes, tolerated only if a guest's XSETBV is measured, here, not to reach KVM
    (pykvm/lane/tcg.py)."""
    with LinuxVM(test_kernel().bzimage, initrd=initramfs(), memory="64M") as vm:
        vm.start(timeout=TIMEOUT)
        vm.console.expect(USERLAND_MARKER, timeout=TIMEOUT)
        # Arithmetic by the shell, so the answer cannot be an echo of what was typed.
        vm.send("echo lane-$((6 * 7))-ok\n")
        vm.console.expect(r"lane-42-ok", timeout=TIMEOUT)
        vm.stop()
        assert_no_kernel_warnings(vm.console.text)


def test_the_selftest_check_passes_here():
    """What `pykvm selftest` runs in L1 (pykvm/lane/check.py), run where this test runs."""
    p = subprocess.run([sys.executable, "-m", "pykvm.lane.check", str(test_kernel().bzimage), str(initramfs())],
                       capture_output=True, text=True, timeout=2 * TIMEOUT + 180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "selftest: ok: /dev/kvm here is" in p.stdout
    assert "selftest: ok: the test kernel reached its busybox userland and powered off" in p.stdout
