"""The VM generation ID on /dev/kvm, with the test kernel (CONFIG_VMGENID): Linux binds pykvm's
device, and a clone's new ID makes its kernel reseed the CRNG at once.

No guest userland is needed, so this runs on KVM-PVM hosts too. The evidence is read from the
guest's RAM and console, not from pykvm's own state:
- binding: Linux's driver (drivers/virt/vmgenid.c, vmgenid_add) copies the 16-byte ID into its
  own state when it binds, so after boot the ID is found in guest RAM a second time, outside the
  bytes pykvm wrote (16 random bytes do not turn up by chance);
- the notification: the driver's notify handler copies the new ID and calls
  add_vmfork_randomness(), which prints "crng reseeded due to virtual machine fork"
  (drivers/char/random.c) - only if the ID changed, so a plain restore must not print it, and
  only once the CRNG is initialized ("crng init done"). The test kernel credits the RNG seed pykvm
  passes in setup_data (RANDOM_TRUST_BOOTLOADER), so its CRNG is ready from the first line, with
  no RNG device and RDRAND hidden on KVM-PVM. (`random.trust_bootloader=on` could not do that on
  x86: 6.1's setup_arch parses setup_data before the command line's early parameters.)
"""

from __future__ import annotations

import pytest

from pykvm.machine import Stop

from conftest import KVM_MARKS

pytestmark = [*KVM_MARKS, pytest.mark.linux]

SAVE_AT = r"Freeing unused kernel image"     # after every initcall: the driver has bound
RUN_INIT = r"Run /init as init process"
RESEED = r"crng reseeded due to virtual machine fork"
TIMEOUT = 900


def copies_in_ram(vm, data: bytes) -> list[int]:
    """Guest-physical addresses where `data` appears, other than the ID's own."""
    own = vm.acpi.vmgenid.gpa
    found = []
    for region in vm.machine.mem.regions:
        ram = bytes(region.backend.view())
        at = ram.find(data)
        while at >= 0:
            if region.gpa + at != own:
                found.append(region.gpa + at)
            at = ram.find(data, at + 1)
    return found


@pytest.fixture(scope="module")
def saved(tmp_path_factory, kernel, rootfs):
    from pykvm.linux import LinuxVM
    path = tmp_path_factory.mktemp("vmgenid") / "vm.snap"
    with LinuxVM(kernel.bzimage, initrd=rootfs, memory="64M", until=SAVE_AT) as vm:
        stop = vm.run(TIMEOUT)
        assert stop.reason == "until", (stop, vm.console.tail())
        guid = vm.acpi.vmgenid.guid
        copies = copies_in_ram(vm, guid)
        vm.save(path)
        console = vm.console.text
    assert "crng init done" in console, "the CRNG is not initialized: nothing to reseed"
    return path, guid, copies, console


def test_the_kernel_binds_the_device_and_keeps_a_copy_of_the_id(saved):
    _, guid, copies, console = saved
    assert guid != bytes(16)
    assert copies, "the ID is nowhere else in guest RAM: Linux's vmgenid driver did not bind"
    assert RESEED not in console


def test_a_clone_gets_a_new_id_and_its_kernel_reseeds_at_once(saved):
    from pykvm.linux import LinuxVM
    path, guid, _, _ = saved
    with LinuxVM.restore(path, until=RESEED, clone=True) as vm:
        new = vm.acpi.vmgenid.guid
        assert new != guid and len(new) == 16
        stop = vm.run(TIMEOUT)
        assert stop.reason == "until", (stop, vm.console.tail())
        # The driver took the new ID: its copy is in RAM. (The old one may stay behind in a
        # stack frame: vmgenid_notify keeps it in a local array to compare.)
        assert copies_in_ram(vm, new), "the new ID was not read by the guest"


def test_a_plain_restore_keeps_the_id_and_does_not_reseed(saved):
    from pykvm.linux import LinuxVM
    path, guid, copies, _ = saved
    with LinuxVM.restore(path, until=RUN_INIT) as vm:
        assert vm.acpi.vmgenid.guid == guid and copies_in_ram(vm, guid) == copies
        seen = []
        vm.console.on_line(RESEED, lambda m: seen.append(m))
        stop = vm.run(TIMEOUT)
        assert stop.reason == "until", (stop, vm.console.tail())
        assert not seen and vm.acpi.vmgenid.generations == 0
