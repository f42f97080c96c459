"""The VM generation ID: 16 bytes in guest memory that change whenever the VM is cloned.

Two clones restored from one snapshot are the same machine, down to the kernel's random number
generator state in RAM: without help they would hand out the same "random" bytes (the same TLS
nonces, the same UUIDs) until each reseeds on its own schedule. Microsoft's "Virtual Machine
Generation ID" specification (2012), which Hyper-V, QEMU (hw/acpi/vmgenid.c) and Firecracker
follow, is the help:

1. the firmware reserves 16 bytes of guest memory for a 128-bit ID and describes them with an ACPI
   device (_CID "VM_GEN_COUNTER", a method ADDR giving the address: pykvm.acpi.dsdt);
2. the OS's driver reads the ID when it binds (Linux: drivers/virt/vmgenid.c mixes it into the
   input pool with add_device_randomness);
3. when the VM is cloned or restored, the VMM writes a new random ID *before the guest runs again*
   and sends the ACPI notification 0x80 to the device - here by raising a general-purpose event
   (pykvm.devices.acpi_pm, GPE 0), whose AML method `\\_GPE._E00` does the Notify;
4. the driver compares the ID with the one it kept and, if it differs, calls
   add_vmfork_randomness(): the CRNG is reseeded at once ("crng reseeded due to virtual machine
   fork" on the console).

The device knows nothing of KVM nor of ACPI's registers: it gets guest memory (read/write by
guest-physical address), the ID's address, and a callback that raises the notification. Its only
state is the ID itself, which lives in guest RAM and so is saved with it.
"""

from __future__ import annotations

import os
from typing import Callable

GUID_SIZE = 16


class VmGenId:
    def __init__(self, memory, gpa: int, notify: Callable[[], None],
                 entropy: Callable[[int], bytes] = os.urandom):
        if gpa % 8 or gpa // 4096 != (gpa + GUID_SIZE - 1) // 4096:
            # The specification: 8-byte aligned, within one page.
            raise ValueError(f"VM generation ID at {gpa:#x} is not 8-byte aligned in one page")
        self.memory = memory
        self.gpa = gpa
        self.notify = notify
        self.entropy = entropy
        self.generations = 0            # new IDs written by this process (tests, stats)

    @property
    def guid(self) -> bytes:
        return bytes(self.memory.read(self.gpa, GUID_SIZE))

    def write_first(self) -> bytes:
        """At a cold boot, before the guest runs: a random ID, no notification (nobody listens)."""
        guid = self.entropy(GUID_SIZE)
        self.memory.write(self.gpa, guid)
        return guid

    def new_generation(self) -> bytes:
        """A clone: a new random ID in guest memory, then the notification. Call it before the
        guest runs on, so that nothing it does after the restore can see the old ID."""
        old = self.guid
        guid = self.entropy(GUID_SIZE)
        while guid == old:              # a driver sees only "changed or not": make sure it did
            guid = self.entropy(GUID_SIZE)
        self.memory.write(self.gpa, guid)
        self.generations += 1
        self.notify()
        return guid
