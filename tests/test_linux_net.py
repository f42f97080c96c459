"""virtio-net: the guest kernel answers ARP and ping from the host over a tap device.

The test makes its own network namespace, runs pykvm inside it (so the tap device is created
there), configures the host end of the tap, and pings the address the guest kernel configured with
`ip=` (CONFIG_IP_PNP). No guest userland is involved: the kernel itself answers ARP and ICMP echo,
so this runs on KVM-PVM hosts too. The kernel is kept alive after its network is up by asking it to
wait for a root device that never comes (`rootwait`).
"""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from pykvm.assets import test_kernel

from conftest import KVM_MARKS

pytestmark = [*KVM_MARKS, pytest.mark.linux]

HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"       # inside the test's own network namespace
TAP = "pykvmtap0"
BOOT_TIMEOUT = 900


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace and a tap device"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist on this host"
    if not shutil.which("ip") or not shutil.which("ping"):
        return "needs iproute2 (ip) and iputils-ping (ping)"
    return None


@pytest.fixture
def netns():
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    name = f"pykvm-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name])


def test_guest_kernel_answers_arp_and_ping(netns, tmp_path):
    log = tmp_path / "console.log"
    append = (f"ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off "
              "root=/dev/vdz rootwait")
    vm = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "pykvm.cli", "boot",
         str(test_kernel().bzimage), "--net", f"tap:{TAP}", "--append", append, "--memory", "64M",
         "--timeout", str(BOOT_TIMEOUT), "--console", str(log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while "IP-Config: Complete" not in (log.read_text(errors="replace") if log.exists() else ""):
            assert vm.poll() is None, vm.communicate()[1]
            assert time.monotonic() < deadline, "the guest never configured its network"
            time.sleep(1)
        ns = ["ip", "netns", "exec", netns]
        subprocess.run(ns + ["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP], check=True)
        subprocess.run(ns + ["ip", "link", "set", TAP, "up"], check=True)
        # The guest is emulated instruction by instruction on KVM-PVM hosts: be patient.
        ping = subprocess.run(ns + ["ping", "-c", "3", "-W", "20", GUEST_IP],
                              capture_output=True, text=True, timeout=180)
        assert ping.returncode == 0, ping.stdout + ping.stderr     # at least one echo reply
        assert re.search(r"[1-3] received", ping.stdout), ping.stdout
        neigh = subprocess.run(ns + ["ip", "neigh", "show", GUEST_IP], capture_output=True, text=True)
        assert "lladdr" in neigh.stdout      # the guest answered ARP with its MAC
        text = log.read_text(errors="replace")
        assert "virtio_net" in text or "eth0" in text
    finally:
        vm.terminate()
        try:
            vm.wait(30)
        except subprocess.TimeoutExpired:
            vm.kill()
