"""The user stories that need guest userland: the busybox shell through vm.shell, poweroff and reboot,
userland disk writes checked by the host, --snapshot, virtio-net, virtio-rng, hvc0, the Python
irqchip, and Debian's stock kernel.

Marked ``amdv``: they run directly on VT-x/AMD-V hosts, and in the AMD-V lane (QEMU TCG,
pykvm/lane) on KVM-PVM hosts, where guest user mode cannot run. Each boot covers several stories
to keep the lane's time down; timings under TCG mean nothing, so nothing here is timed.
"""

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

from pykvm import LinuxVM
from pykvm.assets import USERLAND_MARKER, cloud_kernel, disk_image, initramfs, test_kernel
from pykvm.halt import HaltWatch

from conftest import assert_no_kernel_warnings

pytestmark = [pytest.mark.amdv, pytest.mark.kvm, pytest.mark.linux]

TIMEOUT = 300            # per step; generous for a loaded machine under TCG
MEMORY = "64M"
WRITE_MIB = 6            # "several MiB" of userland writes per disk story


@pytest.fixture(scope="module")
def kernel():
    return test_kernel().bzimage


def sbin(tool):
    path = shutil.which(tool) or shutil.which(tool, path="/sbin:/usr/sbin")
    if path is None:
        pytest.skip(f"needs {tool} (Debian: e2fsprogs)")
    return path


def booted(vm, tmp_path):
    """Start `vm`, its console also in tmp_path/console.log (kept with a failed lane run), wait
    for the busybox init's marker, and check the kernel reported no warning on the way there."""
    log = open(tmp_path / "console.log", "wb")
    vm.console.tee_file(log)
    vm.machine.on_stop.append(lambda stop: log.close())
    vm.start(timeout=3 * TIMEOUT)
    vm.console.expect(USERLAND_MARKER, timeout=TIMEOUT)
    assert_no_kernel_warnings(vm.console.text)
    return vm


def sha256_in(output):
    """A sha256sum line's digest (kernel messages may share the console: look for the digest)."""
    m = re.search(r"\b([0-9a-f]{64})\s+/", output)
    assert m, output
    return m.group(1)


def test_shell_on_hvc0_reads_virtio_rng_and_powers_off(kernel, tmp_path):
    """The shell on the virtio console; /dev/hwrng backed by virtio-rng; `poweroff -f` with no
    kernel message on the console (loglevel=0) and no ACPI to cut the power, so the end is seen in
    the vCPU's state alone."""
    with LinuxVM(kernel, initrd=initramfs(), memory=MEMORY, console="hvc0", rng=True,
                 append="loglevel=0", acpi=False) as vm:
        booted(vm, tmp_path)
        r = vm.shell("echo $((6 * 7)); uname -r")      # arithmetic: no echo of the typed line
        assert r.status == 0 and r.output.splitlines()[0] == "42", r
        assert r.output.splitlines()[1].endswith("-pykvm"), r
        assert vm.shell("false").status == 1
        missing = vm.shell("ls /no/such/file")
        assert missing.status != 0 and "No such file" in missing.output
        assert vm.shell("readlink /proc/$$/fd/1").output == "/dev/hvc0\n"   # the shell's tty
        assert vm.devices.serial.bytes_out == 0           # nothing went to COM1

        rng = vm.virtio[-1]
        assert rng.name == "virtio-rng"
        assert vm.shell("cat /sys/class/misc/hw_random/rng_current").output.startswith("virtio_rng")
        given = rng.bytes_given
        r = vm.shell("head -c 4096 /dev/hwrng | wc -c; head -c 16 /dev/hwrng | od -An -tx1")
        lines = r.output.splitlines()
        assert r.status == 0 and lines[0].strip() == "4096"
        assert rng.bytes_given >= given + 4096 + 16       # read through our device, not a pool
        assert len(set(lines[1].split())) > 4              # 16 random bytes are not all alike

        stop = vm.poweroff(timeout=TIMEOUT)
    assert stop.reason == "halt" and stop.message == HaltWatch.MESSAGE, stop
    assert "System halted" not in vm.console.text


@pytest.mark.parametrize("irqchip, acpi, arg, reason", [
    ("kernel", True, "pykvm.poweroff", "poweroff"),   # PM1a_CNT: SLP_TYP(S5) | SLP_EN
    ("kernel", False, "pykvm.poweroff", "halt"),      # no power-off hardware: the final hlt
    ("kernel", True, "pykvm.reboot", "reset"),        # the FADT's reset register
    ("kernel", False, "pykvm.reboot", "reset"),       # reboot=k: the i8042
    ("user", False, "pykvm.poweroff", "halt"),  # the Python 8259/8254: userland, and the Hlt exit
    ("user", True, "pykvm.poweroff", "poweroff"),   # ACPI with the Python 8259s (SCI on IRQ 9)
])
def test_cli_poweroff_and_reboot_end_with_status_0(kernel, tmp_path, irqchip, acpi, arg, reason):
    log = tmp_path / "console.log"
    p = subprocess.run(
        [sys.executable, "-m", "pykvm.cli", "boot", str(kernel), "--initrd", str(initramfs()),
         "--append", arg, "--irqchip", irqchip, "--memory", MEMORY, "--timeout", str(TIMEOUT),
         "--console", str(log)] + ([] if acpi else ["--no-acpi"]),
        capture_output=True, text=True, timeout=TIMEOUT + 120, stdin=subprocess.DEVNULL)
    text = log.read_text(errors="replace")
    assert USERLAND_MARKER in text, text[-2000:]
    assert p.returncode == 0, p.stderr + text[-2000:]
    assert f"stopped: {reason}" in p.stderr, p.stderr


def test_two_vcpus_halting_for_good_end_the_run_with_no_console_line(kernel, tmp_path):
    """--cpus 2, no ACPI, no kernel messages (loglevel=0): `poweroff -f` halts both CPUs with
    interrupts off inside KVM, and the halt watch, reading each vCPU on its own thread, ends the
    run from their states alone."""
    p = subprocess.run(
        [sys.executable, "-m", "pykvm.cli", "boot", str(kernel), "--initrd", str(initramfs()),
         "--append", "pykvm.poweroff loglevel=0", "--cpus", "2", "--no-acpi", "--memory", MEMORY,
         "--timeout", str(TIMEOUT), "--console", str(tmp_path / "console.log")],
        capture_output=True, text=True, timeout=TIMEOUT + 120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert "stopped: halt" in p.stderr and "KVM_MP_STATE_HALTED" in p.stderr, p.stderr
    assert USERLAND_MARKER in (tmp_path / "console.log").read_text(errors="replace")


def debugfs(image, request):
    p = subprocess.run([sbin("debugfs"), "-R", request, str(image)], capture_output=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("disk_bus", ["virtio-mmio", "virtio-pci", "ide"])
def test_userland_writes_reach_the_ext4_image(kernel, tmp_path, disk_bus):
    """Several MiB written and synced by guest userland; the host finds a clean filesystem and the
    same bytes (by checksum, read with debugfs, no mount needed)."""
    image = tmp_path / "root.ext4"
    shutil.copyfile(disk_image(), image)
    with LinuxVM(kernel, disk=image, disk_bus=disk_bus, append="rw", memory=MEMORY) as vm:
        booted(vm, tmp_path)
        assert vm.shell("cat /etc/pykvm-disk", check=True).output.startswith("pykvm test disk")
        r = vm.shell(f"dd if=/dev/urandom of=/written.bin bs=1M count={WRITE_MIB} 2>/dev/null && "
                     "mkdir -p /pykvm && echo from the guest > /pykvm/note && sync && "
                     "sha256sum /written.bin", timeout=TIMEOUT, check=True)
        guest_sum = sha256_in(r.output)
        # What a clean shutdown does before the power goes: the journal is written back, the
        # filesystem marked clean (`poweroff -f` skips init's unmounting).
        vm.shell("mount -o remount,ro /", timeout=TIMEOUT, check=True)
        stop = vm.poweroff(timeout=TIMEOUT)
    assert stop.reason in ("halt", "poweroff"), stop
    if disk_bus == "ide":
        assert vm.ide.primary.bus_master.transfers > 0       # ata_piix took the DMA engine
    fsck = subprocess.run([sbin("e2fsck"), "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    out = tmp_path / "written.bin"
    debugfs(image, f"dump /written.bin {out}")
    assert out.stat().st_size == WRITE_MIB << 20
    assert hashlib.sha256(out.read_bytes()).hexdigest() == guest_sum
    assert debugfs(image, "cat /pykvm/note") == b"from the guest\n"


def test_snapshot_leaves_the_image_byte_identical_with_the_python_irqchip(kernel, tmp_path):
    """--snapshot under guest writes (the Python 8259/8254 drive this boot: userland on irqchip=user,
    and its final hlt is a Hlt exit)."""
    image = tmp_path / "root.ext4"
    shutil.copyfile(disk_image(), image)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    with LinuxVM(kernel, disk=image, snapshot=True, irqchip="user", append="rw",
                 memory=MEMORY, acpi=False) as vm:      # no ACPI: the power-off is a final hlt
        booted(vm, tmp_path)
        vm.shell("dd if=/dev/zero of=/scratch bs=1M count=2 2>/dev/null && sync", timeout=TIMEOUT,
                 check=True)
        assert vm.shell("wc -c < /scratch").output.strip() == str(2 << 20)
        stop = vm.poweroff(timeout=TIMEOUT)
    assert stop.reason == "halt", stop
    assert vm.stats["interrupts_injected"]          # the Python PIC delivered the interrupts
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


# --- virtio-net: guest userland pings the host end of a tap ------------------------------------

HOST_IP, GUEST_IP = "10.78.0.1", "10.78.0.2"
CLONE_NEWNET = 0x40000000            # <linux/sched.h>


class PrivateNetns:
    """This thread in a fresh network namespace (unshare), and back (setns) on exit: the tap, and
    the `ip` commands started from this thread, live there, not in the host's network."""

    def __enter__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        if self.libc.unshare(CLONE_NEWNET) != 0:
            os.close(self.home)
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        return self

    def __exit__(self, *exc):
        if self.libc.setns(self.home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the original network namespace")
        os.close(self.home)


def test_guest_userland_pings_the_host_over_virtio_net(kernel, tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        pytest.skip("needs root, /dev/net/tun and iproute2 for a tap in a private network namespace")
    with PrivateNetns():
        with LinuxVM(kernel, initrd=initramfs(), memory=MEMORY, net_tap="pykvmtap%d") as vm:
            tap = vm.virtio[-1].backend.name          # the kernel numbered it (pykvmtap%d)
            subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap], check=True)
            subprocess.run(["ip", "link", "set", tap, "up"], check=True)
            booted(vm, tmp_path)
            vm.shell(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up", check=True)
            # One echo: busybox ping paces later ones (and its -W) with alarm(), which the test
            # kernel lacks (no CONFIG_POSIX_TIMERS); it ends on its own after the first reply.
            r = vm.shell(f"ping -c 1 {HOST_IP}", timeout=120)
            assert r.status == 0, r.output
            assert re.search(r"1 packets transmitted, 1 packets received", r.output), r.output
            neigh = subprocess.run(["ip", "neigh", "show", GUEST_IP], capture_output=True, text=True)
            assert "lladdr" in neigh.stdout          # the host learnt the guest's MAC by ARP
            vm.poweroff(timeout=TIMEOUT)


# --- Debian's stock kernels ---------------------------------------------------------------------

def _cloud():
    return cloud_kernel(), r"^6\.1\.0-\d+-cloud-amd64$"


def _standard():
    from pykvm.assets.l1 import l1_kernel        # linux-image-amd64: also the lane's L1 kernel
    return l1_kernel().vmlinuz, r"^6\.1\.0-\d+-amd64$"


@pytest.mark.parametrize("which", [_cloud, _standard], ids=["cloud", "standard"])
def test_debian_kernel_reaches_userland_with_no_extra_arguments(tmp_path, which):
    """...with no warning, BUG or oops on the way, but for the XSAVE one of QEMU's TCG where a
    guest's XSETBV is measured not to reach KVM (pykvm/lane/tcg.py)."""
    kernel, release_pattern = which()
    with LinuxVM(kernel, initrd=initramfs(), memory="256M") as vm:
        assert "initcall_blacklist" not in str(vm.cmdline)
        booted(vm, tmp_path)
        release = vm.shell("uname -r", check=True).output.strip()
        assert re.match(release_pattern, release), release
        stop = vm.poweroff(timeout=TIMEOUT)
        assert_no_kernel_warnings(vm.console.text)    # also after the boot, to the poweroff
    assert stop.reason in ("halt", "poweroff"), stop
