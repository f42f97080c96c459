"""Snapshots: save a stopped VM to a file, restore it in another process, clone it.

1. Every device model lists its state (pykvm/devices/state.py, `Stateful.STATE`); `codec.py`
   writes such values safely.
2. The KVM side - registers, special registers, XSAVE, XCRs, MSRs, LAPIC, events, MP state, debug
   registers, the in-kernel PIC/IOAPIC/PIT and the kvmclock - is read and written by
   pykvm/kvm/state.py, as the kernel's structs.
3. `format.py` lays it all out in one file with per-section checksums, guest RAM page-aligned so
   a restore maps it copy-on-write (`memory.FileBackend`).
4. `machine.py` saves a stopped Machine and applies a snapshot to a Machine built the same way;
   `devices.py` names a machine's devices; `linux.py` does both for a LinuxVM
   (`vm.save(path)`, `LinuxVM.restore(path)`) and gives clones their own identity (a new VM
   generation ID, pykvm/devices/vmgenid.py, and a new MAC).
5. `pytest_plugin.py`: boot once per test session, hand every test a restored VM.
"""

from .machine import Snapshot, SnapshotError, save_machine

__all__ = ["Snapshot", "SnapshotError", "save_machine"]
