"""What a Linux VM is made of, as plain values: `LinuxConfig` and its three groups.

    LinuxConfig
        boot:    BootConfig     kernel, initrd, append, decompress          what to load
        machine: MachineConfig  memory, irqchip, fast_path, pvm_workarounds the hardware and the VMM
        devices: DeviceConfig   disk, disk_bus, readonly, snapshot, rng,    what is plugged in
                                net_tap, console, ioeventfd
        until:   str | None     stop (reason "until") when a console line matches this regex

`LinuxVM(config)` builds a VM from one; `pykvm boot` makes one from its arguments, a test suite's
fixture from its parameters, and a snapshot stores one (`to_dict()`, `LinuxConfig.from_dict()`:
JSON-able). Each group checks its values when it is made, so a bad value fails with one line
(`InputError`) before anything is built.

Every field name is unique across the groups, so one flat set of keywords names them all:
`LinuxConfig.from_options(kernel, memory="1G", disk="root.img")` routes each keyword to its group.
That is what `LinuxVM("bzImage", memory="1G", ...)` does with its keyword arguments: a thin layer
kept because short calls read best that way in tests and examples (a misspelt keyword is a
TypeError, as for any function).

Where a new option goes: a property of the machine or of how pykvm runs it (vCPUs, ACPI, ...) is a
field of MachineConfig; a device the guest sees is a field of DeviceConfig; anything about the
kernel image and its command line is a field of BootConfig. Give it a default that keeps today's
behaviour, check it in the group's `__post_init__`, and it is at once a LinuxVM keyword, a value
the CLI can set, and part of what a snapshot records.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from . import cli_checks
from .cli_checks import InputError
from .x86 import layout

DEFAULT_MEMORY = 256 * layout.MiB
IRQCHIPS = ("kernel", "user")
DISK_BUSES = ("virtio-mmio", "virtio-pci", "ide")
CONSOLES = ("ttyS0", "hvc0")


def _path(value) -> str | None:
    return None if value is None else os.fspath(value)


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"unknown {name} {value!r}: one of {', '.join(choices)}")


@dataclass(frozen=True)
class BootConfig:
    """kernel: bzImage or ELF vmlinux path. initrd: optional initramfs path. append: extra kernel
    arguments. decompress: unpack a bzImage's payload on the host (fast; False keeps the kernel's
    own decompressor)."""

    kernel: str
    initrd: str | None = None
    append: str = ""
    decompress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel", _path(self.kernel))
        object.__setattr__(self, "initrd", _path(self.initrd))
        object.__setattr__(self, "append", self.append or "")


@dataclass(frozen=True)
class MachineConfig:
    """memory: bytes or "256M" (always bytes after). irqchip: "kernel" (KVM's PIC/IOAPIC/LAPIC/PIT,
    the fast default) or "user" (pykvm's Python i8259 pair and i8254; the kernel gets
    `nolapic noapic`). fast_path: answer the hot port I/O (serial console polling, POST port) in C;
    False sends every exit through Python. pvm_workarounds: None = when the host is KVM-PVM.
    pvm_skip_busywork: with the workarounds, also add the arguments that skip boot work only guest
    userland would notice, which cannot run on KVM-PVM (pykvm/pvm/busywork.py); False keeps it.
    acpi: ACPI tables and the PM registers (pykvm.acpi), so the guest powers off and resets the
    way PCs do; False keeps the MP-table-only machine (reboot through the i8042, `reboot=k`, and
    power-off seen on the console). cpus: how many vCPUs (each a thread; the MP table and the
    MADT list them all); more than one needs irqchip "kernel"."""

    memory: int = DEFAULT_MEMORY
    irqchip: str = "kernel"
    fast_path: bool = True
    pvm_workarounds: bool | None = None
    pvm_skip_busywork: bool = True
    acpi: bool = True
    cpus: int = 1

    def __post_init__(self) -> None:
        memory = cli_checks.size(self.memory)
        if memory < layout.MIN_MEMORY:
            raise cli_checks.too_little_memory(self.memory, memory, layout.MIN_MEMORY)
        object.__setattr__(self, "memory", memory)
        _one_of("irqchip", self.irqchip, IRQCHIPS)
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, int) or self.cpus < 1:
            raise InputError(f"--cpus {self.cpus!r}: give a whole number of vCPUs, at least 1")
        if self.cpus > 1 and self.irqchip != "kernel":
            raise InputError(f"--cpus {self.cpus} needs --irqchip kernel: with irqchip "
                             f"{self.irqchip!r} pykvm runs one vCPU (its Python 8259 interrupts "
                             "one CPU, and there are no local APICs to start the others)")


@dataclass(frozen=True)
class DeviceConfig:
    """disk: a raw image path (`readonly`, or `snapshot` to leave it untouched), on `disk_bus`
    "virtio-mmio" (/dev/vda), "virtio-pci" (/dev/vda, found by PCI scan) or "ide" (the PIIX IDE
    primary master, /dev/sda); the root= argument follows unless `append` names a root. rng: a
    virtio-rng. net_tap: a virtio-net on that host tap device. console: "ttyS0" (COM1) or "hvc0"
    (a virtio-console). ioeventfd: virtio-mmio kicks caught by KVM, served off the vCPU thread."""

    disk: str | None = None
    disk_bus: str = "virtio-mmio"
    readonly: bool = False
    snapshot: bool = False
    rng: bool = False
    net_tap: str | None = None
    console: str = "ttyS0"
    ioeventfd: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "disk", _path(self.disk))
        _one_of("disk bus", self.disk_bus, DISK_BUSES)
        _one_of("console", self.console, CONSOLES)
        if self.readonly and self.snapshot:
            raise InputError("readonly and snapshot exclude each other: pick one")


_GROUPS = {"boot": BootConfig, "machine": MachineConfig, "devices": DeviceConfig}


@dataclass(frozen=True)
class LinuxConfig:
    boot: BootConfig
    machine: MachineConfig = field(default_factory=MachineConfig)
    devices: DeviceConfig = field(default_factory=DeviceConfig)
    until: str | None = None

    def __post_init__(self) -> None:
        # Checked here, as every other value is, before a VM exists: LinuxVM only compiles it
        # after building the machine, where a bad pattern would leave that machine unclosed.
        cli_checks.regex(self.until, "until")

    @classmethod
    def from_options(cls, kernel: str | os.PathLike, **options) -> "LinuxConfig":
        """A config from flat keywords (LinuxVM's), each routed to the group that has the field."""
        return cls(BootConfig(kernel)).replace(**options)

    def replace(self, **options) -> "LinuxConfig":
        """A copy with some fields changed, named flat as in from_options."""
        changes: dict[str, dict] = {}
        top = {}
        for name, value in options.items():
            group = _FIELD_GROUP.get(name)
            if group is None:
                if name != "until":
                    raise TypeError(f"unknown LinuxVM option {name!r}")
                top[name] = value
            else:
                changes.setdefault(group, {})[name] = value
        for group, values in changes.items():
            top[group] = dataclasses.replace(getattr(self, group), **values)
        return dataclasses.replace(self, **top)

    def to_dict(self) -> dict:
        """Plain values only (JSON-able): {"boot": {...}, "machine": {...}, "devices": {...},
        "until": ...}."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LinuxConfig":
        groups = {name: kind(**data.get(name, {})) for name, kind in _GROUPS.items()
                  if name != "boot"}
        return cls(BootConfig(**data["boot"]), **groups, until=data.get("until"))


# field name -> the group that has it (names are unique across groups: checked here, at import).
_FIELD_GROUP: dict[str, str] = {}
for _group, _kind in _GROUPS.items():
    for _f in dataclasses.fields(_kind):
        assert _f.name not in _FIELD_GROUP and _f.name != "until", _f.name
        _FIELD_GROUP[_f.name] = _group
del _group, _kind, _f
