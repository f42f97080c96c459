"""Full Linux boots through the public API and the CLI, checked against the kernel's own console.

On a KVM-PVM host no guest userland can run (docs/kvm-pvm.md), so these boots stop at the
kernel's "Run /init"; the userland test is marked `amdv` and runs on VT-x/AMD-V hosts directly and in
the AMD-V lane here (more userland stories: test_linux_userland.py). Each boot prints the command
line it used (visible with pytest -s or on failure).
"""

import re
import subprocess
import sys
import time

import pytest

from pykvm import pvm
from pykvm.assets import USERLAND_MARKER, REBOOT_ARG, cloud_kernel, initramfs
from pykvm import LinuxVM   # the public import the README shows

from conftest import KVM_MARKS, assert_no_kernel_warnings

pytestmark = [*KVM_MARKS, pytest.mark.linux]

RUN_INIT = r"Run /init as init process"
# Generous: a loaded 2-core CI machine emulating every kernel instruction. Typical is ~1 minute.
BOOT_TIMEOUT = 900
# Boot time grows with guest RAM under emulation (the kernel initialises a struct page per 4 KiB):
# the tests give the guest what it needs, no more.
MEMORY = "64M"
ON_PVM = pvm.host_kind() == pvm.KVM_PVM


def boot_lines_in_order(vm, patterns, timeout=BOOT_TIMEOUT):
    for pattern in patterns:
        vm.console.expect(pattern, timeout=timeout)


def test_test_kernel_reaches_init_through_the_library(kernel, rootfs):
    with LinuxVM(kernel.bzimage, initrd=rootfs, memory=MEMORY) as vm:
        print("command line:", vm.cmdline)
        vm.start(timeout=BOOT_TIMEOUT)
        boot_lines_in_order(vm, [
            r"Linux version 6\.1\.",
            r"Command line: .*console=ttyS0",
            r"Unpacking initramfs|Trying to unpack rootfs",
            # Linux's 8250 driver probed our UART and found a 16550A with its interrupt.
            r"ttyS0 at I/O 0x3f8 \(irq = 4, base_baud = 115200\) is a 16550A",
            r"Freeing unused kernel image",
            RUN_INIT,
        ])
        stats = vm.stats
        vm.stop()
    print("stats:", stats)
    assert stats["exits"]["IO"] > 0
    if ON_PVM:
        assert vm.added_pvm_args, "PVM host: pykvm must add the kernel arguments it needs"


def test_vmlinux_elf_boots_too(kernel, rootfs):
    """The ELF vmlinux (with its PVH note) through the same 64-bit entry."""
    with LinuxVM(kernel.vmlinux, initrd=rootfs, memory=MEMORY, until=RUN_INIT) as vm:
        stop = vm.run(timeout=BOOT_TIMEOUT)
        assert stop.reason == "until", (stop, vm.console.tail())
        assert vm.plan.description["format"] == "ELF vmlinux"


def test_cli_boot_until_init_exits_zero(kernel, rootfs, tmp_path):
    log = tmp_path / "console.log"
    p = subprocess.run(
        [sys.executable, "-m", "pykvm.cli", "boot", str(kernel.bzimage), "--initrd", str(rootfs),
         "--until", RUN_INIT, "--timeout", str(BOOT_TIMEOUT), "--console", str(log), "--stats",
         "--memory", MEMORY],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60, stdin=subprocess.DEVNULL)
    print(p.stderr)
    assert p.returncode == 0, p.stderr
    text = log.read_text(errors="replace")
    assert "Linux version 6.1" in text and "Run /init as init process" in text
    assert "stopped: until" in p.stderr
    if ON_PVM:
        assert "added kernel arguments for this host" in p.stderr
    # The command line pykvm says it used is the one the kernel read (init/main.c prints it).
    said = re.search(r"; command line: (.*)", p.stderr).group(1)
    assert f"Kernel command line: {said}\n" in text.replace("\r\n", "\n")


def test_kernel_panic_gives_exit_status_3(kernel, tmp_path):
    """No initramfs and a root device that does not exist: the kernel panics; pykvm says so."""
    p = subprocess.run(
        [sys.executable, "-m", "pykvm.cli", "boot", str(kernel.bzimage), "--append",
         "root=/dev/nonexistent", "--timeout", str(BOOT_TIMEOUT), "--console", "none",
         "--memory", MEMORY],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60, stdin=subprocess.DEVNULL)
    assert p.returncode == 3, p.stderr
    assert "stopped: panic" in p.stderr


@pytest.mark.amdv     # guest userland: directly on VT-x/AMD-V, in the AMD-V lane on KVM-PVM
def test_userland_runs_and_reboots(kernel, rootfs):
    with LinuxVM(kernel.bzimage, initrd=rootfs, append=REBOOT_ARG, memory=MEMORY) as vm:
        vm.start(timeout=BOOT_TIMEOUT)
        vm.console.expect(USERLAND_MARKER, timeout=BOOT_TIMEOUT)
        assert_no_kernel_warnings(vm.console.text)
        stop = vm.wait(BOOT_TIMEOUT)
        assert stop is not None and stop.reason == "reset"   # reboot=k: through the i8042


# Debian's stock cloud kernel: big, and every instruction of its init is emulated on KVM-PVM hosts.
# Measured there (host wall clock to "Run /init"): ~20 minutes with the first busywork-skipping
# arguments and the busybox initramfs, ~7 minutes with all of them and the tiny one, ~220 s after
# later VMM work. Most of those arguments (crypto self-tests, tracefs, BPF kfuncs, the X.509 key,
# /sys/kernel/slab, audit, mitigations, psi, the lockup detectors) skip work only guest userland
# would notice: pykvm adds them itself on KVM-PVM hosts now (pykvm/pvm/busywork.py says what
# each skipped and saved), so a user passes none of them. What is left here changes how the
# kernel keeps time and handles interrupts, which kernel code can see, so pykvm leaves it to the
# user: on KVM-PVM the timer tick's emulated instructions take half or more of the CPU at HZ=250
# (the profile of every phase after interrupts are on), and these trim each tick or interrupt.
STOCK_KERNEL_SPEEDUPS = [
    "tsc=reliable",          # no clocksource watchdog
    # TSC reads instead of kvm-clock's pvclock arithmetic (the TSC rate comes from KVM, see
    # tsc_early_khz), no hrtimer layer under the tick, no spurious-interrupt bookkeeping per
    # interrupt.
    "no-kvmclock",
    "highres=off",
    "noirqdebug",
]
STOCK_TIMEOUT = 1200   # typical on KVM-PVM: ~7 minutes
STOCK_MEMORY = "128M"


@pytest.fixture(scope="module")
def tiny_rootfs():
    # Just an /init: the stock-kernel tests stop at "Run /init" on every host. Unpacking the
    # 2 MB busybox archive cost the stock kernel ~2 minutes on KVM-PVM.
    return initramfs(tiny=True)


def boot_to_init_through_the_cli(kernel, initrd, *args, timeout, tmp_path):
    """`pykvm boot KERNEL --initrd INITRD ARGS --until 'Run /init'` as a user types it, with the
    stock-kernel tests' memory, --stats and a console log; prints what a failure report needs.
    Returns the finished process and the console text."""
    log = tmp_path / "console.log"
    started = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "pykvm.cli", "boot", str(kernel), "--initrd", str(initrd), *args,
         "--until", RUN_INIT, "--timeout", str(timeout), "--console", str(log), "--stats",
         "--memory", STOCK_MEMORY],
        capture_output=True, text=True, timeout=timeout + 60, stdin=subprocess.DEVNULL)
    print(p.stderr)
    print(f"boot took {time.monotonic() - started:.0f} s")
    text = log.read_text(errors="replace")
    print("console tail:\n" + "\n".join(text.splitlines()[-15:]))
    return p, text


def test_debian_cloud_kernel_boots_through_the_cli(tiny_rootfs, tmp_path):
    append = " ".join(STOCK_KERNEL_SPEEDUPS)
    print("stock kernel extra arguments:", append, "| until:", RUN_INIT)
    p, text = boot_to_init_through_the_cli(cloud_kernel(), tiny_rootfs, "--append", append,
                                           timeout=STOCK_TIMEOUT, tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    assert re.search(r"Linux version 6\.1\.\S+-cloud-amd64 .*Debian", text), text[:500]
    assert RUN_INIT in text
    assert "stopped: until" in p.stderr
    if ON_PVM:
        assert "skipping boot work only guest userland would notice" in p.stderr


def test_debian_cloud_kernel_boots_through_the_library(tiny_rootfs):
    """The same boot through LinuxVM and console.expect, as a user's test suite would embed it."""
    append = " ".join(STOCK_KERNEL_SPEEDUPS)
    started = time.monotonic()
    with LinuxVM(cloud_kernel(), initrd=tiny_rootfs, append=append, memory=STOCK_MEMORY) as vm:
        print("command line:", vm.cmdline)
        vm.start(timeout=STOCK_TIMEOUT)
        boot_lines_in_order(vm, [
            r"Linux version 6\.1\.\S+-cloud-amd64 .*Debian",
            r"Command line: .*no-kvmclock" + (r".*initcall_blacklist=" if ON_PVM else ""),
            r"ttyS0 at I/O 0x3f8 \(irq = 4, base_baud = 115200\) is a 16550A",
            RUN_INIT,
        ], timeout=STOCK_TIMEOUT)
        stats = vm.stats
        vm.stop()
    print(f"boot took {time.monotonic() - started:.0f} s; stats:", stats)
    if ON_PVM:
        assert vm.added_pvm_args, "PVM host: pykvm must add the kernel arguments it needs"


# Debian's standard amd64 kernel (linux-image-amd64, also the AMD-V lane's L1 kernel), given to
# pykvm with no kernel arguments at all, as a user would. On KVM-PVM hosts pykvm adds its own:
# those for the emulator's gaps (pykvm/pvm/host.py) and those that skip boot work only guest
# userland would notice (pykvm/pvm/busywork.py), without which this boot stalled here (soft
# lockups, the X.509 key's RSA self-test timing out with -110, no "Run /init" by 1400 s).
STANDARD_TIMEOUT = 1800   # measured on KVM-PVM: 320 s at load 3-4, 777 s at 6-9 (docs/kvm-pvm.md)


def test_debian_standard_kernel_reaches_init_with_no_user_arguments(tiny_rootfs, tmp_path):
    from pykvm.assets.l1 import l1_kernel
    kernel = l1_kernel()
    p, text = boot_to_init_through_the_cli(kernel.vmlinuz, tiny_rootfs, timeout=STANDARD_TIMEOUT,
                                           tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr + text[-3000:]
    assert re.search(rf"Linux version {re.escape(kernel.release)} .*Debian", text), text[:500]
    assert RUN_INIT in text and "stopped: until" in p.stderr
    # What the stall looked like; neither may come back.
    assert "soft lockup" not in text and "Problem loading in-kernel X.509" not in text, text
    if ON_PVM:
        assert "skipping boot work only guest userland would notice" in p.stderr, p.stderr
        assert re.search(r"Command line: .*cryptomgr\.notests .*initcall_blacklist=", text)
