"""Saving a stopped Machine to a file, and putting a saved one back into a new Machine.

What a snapshot holds (format.py has the byte layout):

    META  what to rebuild: the VMM's configuration (`config`, e.g. LinuxVM's options), the RAM
          regions, the host it was taken on, the disks it used (path + fingerprint)
    VCPU  every vCPU's KVM state (pykvm/kvm/state.py)
    VMST  the in-kernel PIC/IOAPIC/PIT and the kvmclock
    DEVS  every device model's state, by name (pykvm/devices/state.py)
    DISK  the copy-on-write overlays of disks opened with snapshot=True
    RAM   guest RAM, page-aligned, mapped copy-on-write on restore

Restoring is the reverse of building: the restoring VMM builds *the same machine* (same devices,
same wiring, from META's config), with its RAM mapped from the file (`Snapshot.ram_backend`) and
without loading any kernel; then `Snapshot.apply(machine, devices)` sets the KVM state and the
device state. The machine then runs on from the instruction where it stopped.

A snapshot is taken of a *stopped* machine: `save_machine` first lets KVM finish the instruction
of the last exit (an `in` gets its data, RIP moves past it: Vcpu.complete_io), then reads.
"""

from __future__ import annotations

import os
import threading
import time

from pykvm.devices.state import StateError
from pykvm.kvm.errors import KvmError
from pykvm.memory import FileBackend

from . import codec
from .format import FORMAT_VERSION, SnapshotFile, SnapshotFormatError, write


class SnapshotError(Exception):
    """A snapshot cannot be saved or restored here (one line, for the CLI): bad or corrupted file,
    another host, a disk that changed since."""


# ---- the host a snapshot is bound to ----

def _cpu_model() -> tuple[str, str]:
    vendor = model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "model name" and not model:
                    model = value.strip()
                if vendor and model:
                    break
    except OSError:
        pass
    return vendor, model


def host_fingerprint(machine) -> dict:
    """What must match for a restore: the CPU (the guest saw its CPUID; on KVM-PVM it sees the
    host's own), what backs /dev/kvm, the TSC rate (Linux calibrated against it), and the sizes
    of the KVM structs saved. The kernel release is recorded, not required."""
    from pykvm import pvm
    from pykvm.kvm import state as kvm_state
    vendor, model = _cpu_model()
    try:
        tsc_khz = machine.vcpu.tsc_khz()
    except OSError:
        tsc_khz = 0
    return {"kvm": pvm.host_kind(), "cpu_vendor": vendor, "cpu_model": model,
            "tsc_khz": tsc_khz, "structs": kvm_state.struct_sizes(),
            # os.uname() is what the platform module reads, without its import (restore start-up)
            "kernel": os.uname().release, "machine": os.uname().machine}


def check_host(saved: dict, here: dict, path: str) -> None:
    for key, what in (("machine", "architecture"), ("kvm", "KVM"), ("cpu_vendor", "CPU vendor"),
                      ("cpu_model", "CPU model"), ("structs", "KVM struct layout")):
        if saved.get(key) != here.get(key):
            s = saved.get(key) if key != "structs" else "another"
            h = here.get(key) if key != "structs" else "this one"
            raise SnapshotError(f"{path} was saved on another host ({what}: {s}; here: {h})")
    # The guest measured its TSC once, at boot; a rate off by more than 0.1% breaks its clock.
    a, b = saved.get("tsc_khz") or 0, here.get("tsc_khz") or 0
    if a and b and abs(a - b) * 1000 > a:
        raise SnapshotError(f"{path} was saved on a host with a {a} kHz TSC; this one runs at "
                            f"{b} kHz")


# ---- disks: reattached by path, refused if they changed ----

_SAMPLES = 16
_SAMPLE_SIZE = 64 * 1024


def disk_fingerprint(path: str) -> dict:
    """Size, modification time and a SHA-256 over 16 64 KiB samples spread over the image (the
    first and last included): cheap for any size, and a changed image is very unlikely to pass."""
    st = os.stat(path)
    import hashlib          # here: a restore without disks need not load it
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = st.st_size
        for i in range(_SAMPLES):
            offset = (size - _SAMPLE_SIZE) * i // (_SAMPLES - 1) if size > _SAMPLE_SIZE else 0
            f.seek(max(offset, 0))
            h.update(f.read(_SAMPLE_SIZE))
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": h.hexdigest()}


def check_disk(saved: dict, path: str | None = None) -> None:
    path = path or saved["path"]
    if not os.path.isfile(path):
        raise SnapshotError(f"disk image {path} that the snapshot uses is gone")
    now = disk_fingerprint(path)
    for key, what in (("size", "its size"), ("mtime_ns", "its modification time"),
                      ("sha256", "its contents")):
        if now[key] != saved[key]:
            raise SnapshotError(f"disk image {path} changed since the snapshot was saved "
                                f"({what} differs): refusing to restore over it")


# ---- save ----

def save_machine(path: str | os.PathLike, machine, devices: dict, *, config: dict | None = None,
                 disks: dict | None = None) -> int:
    """Write a stopped `machine` and its `devices` ({name: Stateful}) to `path`. `config` is
    whatever the restoring side needs to rebuild the same machine; `disks` is {name: DiskImage}
    (fingerprinted; their overlays saved when opened with snapshot=True). Returns the file size."""
    from pykvm.kvm import state as kvm_state
    import stat
    # The file is written beside `path` and renamed over it: a device node or FIFO there would be
    # replaced by a regular file (as root, /dev/null itself), so only a regular file is overwritten.
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise SnapshotError(f"{os.fspath(path)} is not a regular file: a snapshot replaces the "
                            "file it is saved to; give a regular file's name")
    if machine.running and getattr(machine, "_thread", None) is not threading.current_thread():
        # (On the thread start() made, in an on_stop hook, every vCPU is out of KVM_RUN: fine.)
        raise SnapshotError("cannot save a running machine: stop it first")
    irqchip = machine.irqchip == "kernel"
    msr_indices = machine.kvm.msr_index_list()
    vcpus = []
    for vcpu in machine.vm.vcpus:
        vcpu.complete_io()
        vcpus.append(kvm_state.save_vcpu(vcpu, msr_indices, irqchip=irqchip))
    vm_state = kvm_state.save_vm(machine.vm, irqchip=irqchip)
    locks = _device_locks(devices)
    for lock in locks:          # virtio workers (ioeventfd, net rx) stay out while we read
        lock.acquire()
    try:
        dev_state = {name: d.save_state() for name, d in devices.items()}
        disk_meta, overlays = {}, {}
        for name, disk in (disks or {}).items():
            disk.flush()
            disk_meta[name] = {**disk_fingerprint(disk.path), "readonly": disk.readonly,
                               "snapshot": disk.snapshot}
            if disk.overlay is not None:
                overlays[name] = [(offset, bytes(data)) for offset, data in disk.overlay.chunks()]
        meta = {"format": FORMAT_VERSION, "config": config or {}, "created": time.time(),
                "regions": [(r.gpa, r.size) for r in machine.mem.regions],
                "irqchip": machine.irqchip, "host": host_fingerprint(machine),
                "disks": disk_meta, "vcpus": len(vcpus)}
        sections = {"META": codec.encode(meta), "VCPU": codec.encode(vcpus),
                    "VMST": codec.encode(vm_state), "DEVS": codec.encode(dev_state),
                    "DISK": codec.encode(overlays)}
        result = write(path, sections, [r.backend.view() for r in machine.mem.regions])
    finally:
        for lock in locks:
            lock.release()
    return result["size"]


def _device_locks(devices: dict) -> list:
    locks = []
    for d in devices.values():
        inner = getattr(d, "device", None)      # a virtio transport: its device's lock
        lock = getattr(inner, "lock", None) or getattr(d, "lock", None)
        if lock is not None and hasattr(lock, "acquire"):
            locks.append(lock)
    return locks


# ---- restore ----

class Snapshot:
    """An opened, checked snapshot file. `meta["config"]` says what to build; build it with
    `ram_backend` as the Machine's RAM; then `apply(machine, devices)`."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = os.fspath(path)
        try:
            self.file = SnapshotFile(self.path)
        except SnapshotFormatError as e:
            raise SnapshotError(str(e)) from None
        try:
            missing = [n for n in ("META", "VCPU", "VMST", "DEVS", "DISK") if n not in self.file.sections]
            if missing:
                raise SnapshotError(f"{self.path}: sections missing: {', '.join(missing)}")
            self.meta = self._decode("META")
            self.regions = [tuple(r) for r in self.meta["regions"]]
            self._offsets = dict(zip(self.regions, self.file.ram_offsets(
                [size for _, size in self.regions])))
            if verify:
                self.file.verify_ram([size for _, size in self.regions])
        except SnapshotFormatError as e:
            self.close()
            raise SnapshotError(str(e)) from None
        except (KeyError, TypeError, ValueError) as e:
            self.close()
            raise SnapshotError(f"{self.path}: malformed metadata ({e})") from None
        except BaseException:
            self.close()
            raise

    def _decode(self, name: str):
        try:
            return codec.decode(self.file.sections[name])
        except codec.CodecError as e:
            raise SnapshotError(f"{self.path}: section {name}: {e}") from None

    @property
    def config(self) -> dict:
        return self.meta["config"]

    def check_host(self, machine) -> None:
        check_host(self.meta["host"], host_fingerprint(machine), self.path)

    def check_disks(self) -> None:
        for saved in self.meta["disks"].values():
            check_disk(saved)

    def ram_backend(self, gpa: int, size: int) -> FileBackend:
        """For Machine(ram=...): region (gpa, size) mapped copy-on-write from the file."""
        offset = self._offsets.get((gpa, size))
        if offset is None:
            raise SnapshotError(f"{self.path} has no RAM region {gpa:#x}+{size:#x}: "
                                "the machine being restored is not built like the saved one")
        return FileBackend(self.file.fd, offset, size)

    def apply(self, machine, devices: dict, disks: dict | None = None) -> None:
        """Put the KVM state and the device state back. `machine` was built like the saved one,
        with `ram_backend`; `devices` and `disks` are named as when saving."""
        self.check_host(machine)
        vcpus = self._decode("VCPU")
        if len(vcpus) != len(machine.vm.vcpus):
            raise SnapshotError(f"{self.path} has {len(vcpus)} vCPUs, the machine "
                                f"{len(machine.vm.vcpus)}")
        vm_state = self._decode("VMST")
        dev_state = self._decode("DEVS")
        if set(dev_state) != set(devices):
            raise SnapshotError(f"{self.path}: saved devices ({', '.join(sorted(dev_state))}) "
                                f"differ from the machine's ({', '.join(sorted(devices))})")
        from pykvm.kvm import state as kvm_state
        try:
            kvm_state.restore_vm(machine.vm, vm_state)
            for vcpu, state in zip(machine.vm.vcpus, vcpus):
                kvm_state.restore_vcpu(vcpu, state)
            kvm_state.restore_clock(machine.vm, vm_state)
            # After the in-kernel irqchip: the devices' interrupt lines take their levels back
            # without driving them (pykvm/devices/state.py says why).
            for name, device in devices.items():
                device.restore_state(dev_state[name])
        except (StateError, KeyError, TypeError) as e:
            raise SnapshotError(f"{self.path}: saved state does not fit this machine ({e})") from None
        except KvmError as e:
            raise SnapshotError(f"{self.path}: KVM refused the saved state ({e})") from None
        overlays = self._decode("DISK")
        for name, disk in (disks or {}).items():
            if name in overlays:
                if disk.overlay is None:
                    raise SnapshotError(f"{self.path}: disk {name!r} was saved with an overlay; "
                                        "it is attached without one")
                try:
                    for offset, data in overlays[name]:
                        disk.overlay.load(offset, data)
                except (ValueError, TypeError) as e:
                    raise SnapshotError(f"{self.path}: the saved overlay of disk {name!r} does "
                                        f"not fit it ({e})") from None

    def close(self) -> None:
        self.file.close() if hasattr(self, "file") else None

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
