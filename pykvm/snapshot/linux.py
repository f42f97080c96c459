"""Snapshots of a LinuxVM: `vm.save(path)` and `LinuxVM.restore(path)` (pykvm/linux.py) land here.

Saving records the LinuxVM's options (what it was built from), so restoring builds the same VM -
same devices at the same addresses, same disk attached the same way - with its RAM mapped from the
snapshot and no kernel loaded, and then puts every vCPU, the in-kernel irqchip and every device
model back where they were. The console starts empty: it shows what the guest prints from the
instruction after the save on.

Clones (`clone=True`): every restore of one snapshot is the same machine, down to the state of the
guest's random number generator. A clone gets what QEMU and Firecracker give theirs:
- a new VM generation ID (with ACPI, the default: pykvm/devices/vmgenid.py), written before the
  guest runs on and announced through GPE 0: Linux's vmgenid driver reseeds the kernel's CRNG at
  once, so two clones' /dev/urandom differ from their first read after the notification is
  handled (a kernel worker runs the AML; until then - a few instructions after the restore - the
  old state is still there, as on any VMM);
- a new MAC address on its virtio-net device (the device's config space; a guest driver that
  already read it keeps the old one until it re-reads);
- fresh host entropy from its virtio-rng for every request from then on (the device reads
  os.urandom; nothing of the original's entropy is replayed).
Without ACPI (`acpi=False`) there is no generation ID: the guest's CRNG is the original's until
Linux reseeds on its own schedule (from virtio-rng through hwrng, and interrupt timings).
"""

from __future__ import annotations

import os

from .devices import machine_devices, unsaved_devices
from .machine import Snapshot, SnapshotError, save_machine


def save_linux(vm, path: str | os.PathLike) -> int:
    """Save a stopped LinuxVM. Returns the file's size in bytes."""
    disks = {"disk": vm.disk} if vm.disk is not None else {}
    config = {"kind": "LinuxVM", "config": vm.config.to_dict(),
              # The CLI's QEMU-compatible test devices (pykvm/testdevs.py) are added after the
              # LinuxVM is built; the restoring side adds them again the same way.
              "test_devices": getattr(vm, "test_devices", None),
              "unsaved_devices": unsaved_devices(vm.machine),
              # The command line as the guest got it: a restore reads no kernel, so it could not
              # tell which of pykvm's own arguments were left off for this one (boot/params.py).
              "cmdline": str(vm.cmdline), "added_pvm_args": list(vm.added_pvm_args),
              "skipped_busywork": list(vm.skipped_busywork)}
    return save_machine(path, vm.machine, machine_devices(vm.machine), config=config, disks=disks)


def save_on_stop(vm, path: str | os.PathLike, when=None) -> None:
    """Save `vm` to `path` whenever its run ends (any stop: until, timeout, panic, a stop() from
    another thread, ...), or only when `when(stop)` is true. The save runs on the vCPU's thread
    right after it left KVM_RUN, before run() returns or wait() wakes."""
    def hook(stop) -> None:
        if when is None or when(stop):
            save_linux(vm, path)
    vm.machine.on_stop.insert(0, hook)


def restore_linux(cls, path: str | os.PathLike, *, until: str | None = None,
                  clone: bool = False, verify: bool = False, **overrides):
    """Build a LinuxVM like the saved one and put the saved state into it. `overrides`: options
    that may differ from the saved VM's without changing the machine (fast_path, ioeventfd,
    pvm_workarounds)."""
    from pykvm.cli_checks import regex
    regex(until, "until")   # a one-line InputError of its own, not "does not fit this pykvm"
    allowed = {"fast_path", "ioeventfd", "pvm_workarounds"}
    bad = set(overrides) - allowed
    if bad:
        raise SnapshotError(f"these options cannot change on restore: {', '.join(sorted(bad))}")
    snap = Snapshot(path, verify=verify)
    try:
        from pykvm.cli_checks import InputError
        from pykvm.config import LinuxConfig
        kind = snap.config.get("kind")
        if kind != "LinuxVM" or not isinstance(snap.config.get("config"), dict):
            raise SnapshotError(f"{snap.path} is a snapshot of a {kind or 'machine'}, not of a "
                                "LinuxVM")
        try:
            config = LinuxConfig.from_dict(snap.config["config"]).replace(until=until, **overrides)
        except (TypeError, KeyError, InputError) as e:   # saved by a pykvm with other options
            raise SnapshotError(f"{snap.path}: its VM configuration does not fit this pykvm "
                                f"({e})") from None
        snap.check_disks()
        vm = cls(config, _restore=snap)
    finally:
        snap.close()
    if clone:
        make_clone(vm)
    return vm


def apply_to(vm, snap: Snapshot) -> None:
    """Called by LinuxVM.__init__ with `_restore`: the machine is built, its RAM is the snapshot's."""
    from pykvm.x86 import cpu
    test_devices = snap.config.get("test_devices")
    if test_devices:
        from pykvm.testdevs import add_test_devices
        add_test_devices(vm.machine, **test_devices)
        vm.test_devices = test_devices
    for vcpu in vm.machine.vm.vcpus:      # each with its own APIC id, as when it was booted
        cpu.setup_cpuid(vm.machine.kvm, vcpu)
    disks = {"disk": vm.disk} if vm.disk is not None else {}
    snap.apply(vm.machine, machine_devices(vm.machine), disks)
    _adopt_cmdline(vm, snap)


def _adopt_cmdline(vm, snap: Snapshot) -> None:
    """vm.cmdline and the lists of pykvm's own arguments as the guest booted with them, in place of
    the ones LinuxVM made from the configuration (which still hold the arguments the kernel did
    not know). A snapshot that does not record them (pykvm before session 6) keeps those."""
    text = snap.config.get("cmdline")
    if not isinstance(text, str):
        return
    from pykvm.boot import BootError
    from pykvm.boot.cmdline import Cmdline
    try:
        vm.cmdline = Cmdline(text)
    except BootError as e:
        raise SnapshotError(f"{snap.path}: its command line is unusable ({e})") from None
    for name in ("added_pvm_args", "skipped_busywork"):
        value = snap.config.get(name)
        if isinstance(value, list) and all(isinstance(arg, str) for arg in value):
            setattr(vm, name, value)


def make_clone(vm) -> None:
    """Give a restored VM its own identity (see the module docstring for what that covers)."""
    if vm.acpi is not None:
        vm.acpi.vmgenid.new_generation()
    from pykvm.virtio import VirtioNet
    from pykvm.virtio.net import random_mac
    for device in vm.virtio:
        if isinstance(device, VirtioNet):
            device.mac = random_mac()
            device.config_changed()
