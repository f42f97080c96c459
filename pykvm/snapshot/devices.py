"""Which device models a machine has, by a name that is the same in the process that restores.

`machine_devices(machine)` walks the port and MMIO buses and names every device model that keeps
state (pykvm/devices/state.py's `Stateful`) by bus and base address ("pio@0x3f8"): a machine
built from the same configuration puts the same devices at the same addresses, so the names
match. Adapters are looked through (a LockedDevice or a Window reaches its device; the PCI
configuration ports reach the whole PCI bus, which saves every function plugged into it; BAR
windows are skipped, their function being saved with the bus). The Python interrupt controller
(irqchip="user") is added as "userirq".

Devices on the buses that keep no state are listed by `unsaved_devices`, so a snapshot can say
what it does not hold.
"""

from __future__ import annotations

from pykvm.bus import LockedDevice, Window
from pykvm.devices.pci.bus import ConfigMechanism1, _BarWindow
from pykvm.devices.state import Stateful


def _walk(machine):
    for bus in (machine.pio, machine.mmio):
        for r in bus.ranges():
            device = r.device
            while isinstance(device, (LockedDevice, Window)):
                device = device.device
            if isinstance(device, _BarWindow):
                continue
            if isinstance(device, ConfigMechanism1):
                device = device.pci
            yield f"{bus.name}@{r.base:#x}", r.name, device


def machine_devices(machine) -> dict[str, Stateful]:
    found: dict[str, Stateful] = {}
    seen: set[int] = set()
    for key, _, device in _walk(machine):
        if isinstance(device, Stateful) and id(device) not in seen:
            seen.add(id(device))
            found[key] = device
    if getattr(machine, "userirq", None) is not None:
        found["userirq"] = machine.userirq
    return found


def unsaved_devices(machine) -> list[str]:
    """The bus entries whose device keeps no saved state (e.g. "fw-assist at pio@0xf8")."""
    return [f"{name} at {key}" for key, name, device in _walk(machine)
            if not isinstance(device, Stateful)]
