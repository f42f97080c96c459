"""Snapshots with guest userland: saved at the busybox prompt, restored, a command run; two clones
restored side by side read different bytes from /dev/urandom at once: the VM generation ID makes
their kernels reseed.

Marked ``amdv``: they need guest user mode, so on KVM-PVM hosts they run in the AMD-V lane
(pykvm/lane). Nothing here is timed.
"""

import pytest

from pykvm import LinuxVM
from pykvm.assets import USERLAND_MARKER, initramfs, test_kernel

from conftest import assert_no_kernel_warnings

pytestmark = [pytest.mark.amdv, pytest.mark.kvm, pytest.mark.linux]

TIMEOUT = 600
MEMORY = "64M"


@pytest.fixture(scope="module")
def at_the_prompt(tmp_path_factory):
    """The test kernel booted to the busybox shell (with a virtio-rng), saved there."""
    path = tmp_path_factory.mktemp("snap") / "prompt.snap"
    with LinuxVM(test_kernel().bzimage, initrd=initramfs(), memory=MEMORY, rng=True) as vm:
        vm.start(timeout=3 * TIMEOUT)
        vm.console.expect(USERLAND_MARKER, timeout=TIMEOUT)
        assert_no_kernel_warnings(vm.console.text)
        assert vm.shell("echo ready").output == "ready\n"
        vm.stop()
        vm.save(path)
    return path


def test_restored_at_the_prompt_runs_a_command(at_the_prompt):
    with LinuxVM.restore(at_the_prompt) as vm:
        vm.start(timeout=3 * TIMEOUT)
        r = vm.shell("echo $((6 * 7)); uname -r; cat /proc/uptime")
        lines = r.output.splitlines()
        assert r.status == 0 and lines[0] == "42", r
        assert lines[1].endswith("-pykvm"), r
        # The guest's clock went on from where it was saved, not from zero.
        assert float(lines[2].split()[0]) > 1.0, r


RESEED = "crng reseeded due to virtual machine fork"


def test_two_clones_read_different_random_bytes(at_the_prompt):
    with LinuxVM.restore(at_the_prompt, clone=True) as a, \
            LinuxVM.restore(at_the_prompt, clone=True) as b:
        assert a.acpi.vmgenid.guid != b.acpi.vmgenid.guid
        a.start(timeout=3 * TIMEOUT)
        b.start(timeout=3 * TIMEOUT)
        # The kernel's CRNG: both clones start from the same saved state. Each got its own VM
        # generation ID before it ran on, and GPE 0; Linux's vmgenid driver, notified, calls
        # add_vmfork_randomness(), which reseeds the CRNG at once and says so. (Linux would
        # otherwise reseed on its own schedule, every uptime/2 s early on, at most every 60 s.)
        for vm in (a, b):
            vm.console.expect(RESEED, timeout=TIMEOUT)
        rnd = [vm.shell("head -c 16 /dev/urandom | od -An -tx1").output for vm in (a, b)]
        assert rnd[0] != rnd[1] and all(len(r.split()) == 16 for r in rnd), rnd
        # virtio-rng: each clone's device serves fresh host entropy (nothing of the original's
        # is replayed), so the hardware RNG reads differ too.
        hw = [vm.shell("head -c 16 /dev/hwrng | od -An -tx1").output for vm in (a, b)]
        assert hw[0] != hw[1] and all(len(h.split()) == 16 for h in hw), hw

