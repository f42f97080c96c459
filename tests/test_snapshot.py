"""Snapshots on /dev/kvm: save a running guest, restore it in a new process, clone it.

- a firmware guest (firmware/checksum.c) stopped in the middle of its compute loop, saved, and
  restored in another process, finishes with the checksum of a run that was never interrupted;
- the test kernel saved mid-boot (at "Freeing unused kernel image") and restored in another
  process reaches "Run /init" with the same console lines after the save point as the original,
  which itself carries on after being saved;
- 20 clones of that snapshot run side by side, each to "Run /init";
- a snapshot the restoring side cannot use (truncated, corrupted, another version, another host,
  a changed disk) gets `pykvm restore` exit status 2 and a one-line message.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pykvm.machine import Stop
from pykvm.snapshot import Snapshot, SnapshotError, codec, save_machine
from pykvm.snapshot import format as F
from pykvm.snapshot.devices import machine_devices

from conftest import KVM_MARKS

pytestmark = KVM_MARKS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import snapshot_firmware  # noqa: E402

PYKVM = [sys.executable, "-m", "pykvm.cli"]
ROUNDS, STEPS = 48, 2_000_000


def test_checksum_firmware_matches_a_reference_computation():
    """The firmware computes what its comment says (checked against Python on a short run)."""
    from pykvm.testing.firmware import run_firmware
    mask = (1 << 64) - 1
    x, s, mix = 0x9E3779B97F4A7C15, 0, [(i * 0x100000001B3) & mask for i in range(64)]
    for _ in range(3):
        for i in range(5000):
            x ^= (x << 13) & mask
            x ^= x >> 7
            x ^= (x << 17) & mask
            mix[x & 63] = (mix[x & 63] + x) & mask
            s = ((s ^ mix[(x >> 6) & 63]) * 0x100000001B3 + i) & mask
    r = run_firmware("checksum", args=(3, 5000))
    assert r.status == 0 and f"checksum {s:#x}" in r.text


def test_firmware_saved_mid_loop_finishes_with_the_right_checksum(tmp_path):
    from pykvm.testing.firmware import run_firmware
    whole = run_firmware("checksum", args=(ROUNDS, STEPS))
    assert whole.status == 0

    started = threading.Event()
    m, out = snapshot_firmware.boot((ROUNDS, STEPS), on_output=lambda text: (
        b"round 1 " in text and started.set()))
    try:
        # Stop 50 ms after round 1 is reported: a kick lands inside the loop (guest CPL3
        # code, ~20 ms a round), not at a port-I/O exit.
        def stop_soon():
            if started.wait(30):
                time.sleep(0.05)
                m.request_stop(Stop("interrupted", message="save"))
        threading.Thread(target=stop_soon, daemon=True).start()
        stop = m.run(timeout=60)
        assert stop.reason == "interrupted", stop
        before = out.decode()
        assert "checksum" not in before, "the loop ended before the save: make it longer"
        save_machine(tmp_path / "fw.snap", m, machine_devices(m), config={"firmware": "checksum"})
    finally:
        m.close()

    r = subprocess.run([sys.executable, str(HERE / "snapshot_firmware.py"), "restore",
                        str(tmp_path / "fw.snap")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    after, _, last = r.stdout.rpartition("STOP ")
    assert last.strip() == "exit 0"
    # The interrupted run, continued in another process, printed exactly what the whole run did.
    assert before + after == whole.text


# ---- Linux ----

SAVE_AT = r"Freeing unused kernel image"
RUN_INIT = r"Run /init as init process"
BOOT_TIMEOUT = 900


def _lines_after(text: str, pattern: str) -> list[str]:
    """Console lines after the first line matching `pattern`, timestamps dropped."""
    lines = [re.sub(r"^\[\s*\d+\.\d+\] ", "", ln).rstrip("\r")
             for ln in text.replace("\r\n", "\n").split("\n")]
    start = next(i for i, ln in enumerate(lines) if re.search(pattern, ln))
    return [ln for ln in lines[start + 1:] if ln]


@pytest.fixture(scope="module")
def saved_linux(tmp_path_factory):
    """Boot the test kernel to SAVE_AT (with a disk attached --snapshot style, and some bytes in
    its overlay), save, then let the original run on to Run /init. Returns (snapshot path,
    original's lines after the save point, disk image path, overlay bytes)."""
    pytest.importorskip("pykvm.assets")
    from pykvm.assets import initramfs, test_kernel
    from pykvm.assets.errors import AssetError
    from pykvm.linux import LinuxVM
    try:
        kernel = test_kernel(build=False)
    except AssetError as e:
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp("snap")
    disk = d / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    path = d / "linux.snap"
    from pykvm.snapshot.linux import save_on_stop
    with LinuxVM(kernel.bzimage, initrd=initramfs(), memory="64M", until=SAVE_AT,
                 disk=disk, snapshot=True, rng=True, append="root=/dev/ram0") as vm:
        vm.disk.write(4096, b"written before the save")     # as a guest write would land
        # Saved by the library as the run stops, from the vCPU's thread (start(), not run()).
        save_on_stop(vm, path, when=lambda stop: stop.reason == "until")
        vm.start(BOOT_TIMEOUT)
        stop = vm.wait()
        assert stop.reason == "until", (stop, vm.console.tail())
        assert path.exists()
        vm.machine.on_stop.pop(0)
        # Saving does not end the VM: it runs on to Run /init.
        vm.console.on_line(RUN_INIT, lambda m: vm.machine.request_stop(
            Stop("until", message="init")))
        stop = vm.run(BOOT_TIMEOUT)
        assert stop.reason == "until", (stop, vm.console.tail())
        original = vm.console.text
    return path, _lines_after(original, SAVE_AT), disk


@pytest.mark.linux
def test_linux_saved_mid_boot_reaches_init_in_a_new_process(saved_linux, tmp_path):
    path, original_after, _ = saved_linux
    log = tmp_path / "console.log"
    r = subprocess.run(PYKVM + ["restore", str(path), "--until", RUN_INIT, "--console", str(log),
                                "--timeout", str(BOOT_TIMEOUT)],
                       capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60)
    assert r.returncode == 0, r.stderr
    text = log.read_bytes().decode(errors="replace")
    assert RUN_INIT in text
    # The restored guest prints what the original printed after the save point, line for line.
    restored = [ln for ln in _lines_after("SAVED\n" + text, "SAVED")]
    assert restored == original_after[:len(restored)] and restored[-1].startswith("Run /init")


@pytest.mark.linux
def test_library_restore_keeps_the_disk_overlay(saved_linux):
    from pykvm.linux import LinuxVM
    path, _, disk = saved_linux
    with LinuxVM.restore(path) as vm:
        assert vm.disk.read(4096, 23) == b"written before the save"
        assert vm.disk.snapshot
    assert Path(disk).read_bytes()[4096:4119] != b"written before the save"


@pytest.mark.linux
def test_twenty_clones_side_by_side(saved_linux, tmp_path):
    path, _, _ = saved_linux
    procs = []
    for i in range(20):
        log = tmp_path / f"clone{i}.log"
        procs.append((log, subprocess.Popen(
            PYKVM + ["restore", str(path), "--clone", "--until", RUN_INIT, "--console", str(log),
                     "--timeout", str(BOOT_TIMEOUT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    failures = []
    for log, p in procs:
        _, err = p.communicate(timeout=BOOT_TIMEOUT + 120)
        if p.returncode != 0 or RUN_INIT not in log.read_text(errors="replace"):
            failures.append((p.returncode, err[-500:]))
    assert not failures, failures


def _rewrite(src: Path, dst: Path, change) -> None:
    """Copy a snapshot, letting `change(sections)` edit the decoded sections first."""
    snap = Snapshot(src)
    sections = {n: codec.decode(b) for n, b in snap.file.sections.items()}
    sizes = [s for _, s in snap.regions]
    offsets = snap.file.ram_offsets(sizes)
    ram = [memoryview(os.pread(snap.file.fd, s, o)) for s, o in zip(sizes, offsets)]
    snap.close()
    change(sections)
    F.write(dst, {n: codec.encode(v) for n, v in sections.items()}, ram)


@pytest.mark.linux
def test_unusable_snapshots_exit_2_with_one_line(saved_linux, tmp_path):
    path, _, disk = saved_linux
    data = Path(path).read_bytes()
    cases = {
        "truncated": (data[:len(data) // 2], "truncated"),
        "corrupted": (data[:300] + bytes([data[300] ^ 0xFF]) + data[301:], "corrupted"),
        "version": (data[:8] + (99).to_bytes(4, "little") + data[12:], "version 99"),
        "empty": (b"", "not a pykvm snapshot"),
    }
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name}.snap"
        bad.write_bytes(content)
        r = subprocess.run(PYKVM + ["restore", str(bad), "--console", "none"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (name, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)

    def other_host(sections):
        sections["META"]["host"]["cpu_model"] = "a CPU this host is not"
    _rewrite(Path(path), tmp_path / "host.snap", other_host)
    r = subprocess.run(PYKVM + ["restore", str(tmp_path / "host.snap"), "--console", "none"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "another host" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    # The disk the snapshot uses changes: refused (a copy of it, so the other tests keep theirs).
    moved = tmp_path / "disk-copy.img"
    moved.write_bytes(Path(disk).read_bytes())

    def elsewhere(sections):
        sections["META"]["disks"]["disk"]["path"] = str(moved)
        sections["META"]["config"]["config"]["devices"]["disk"] = str(moved)
        from pykvm.snapshot.machine import disk_fingerprint
        sections["META"]["disks"]["disk"].update(
            {k: v for k, v in disk_fingerprint(str(moved)).items() if k != "path"})
    _rewrite(Path(path), tmp_path / "disk.snap", elsewhere)
    with open(moved, "r+b") as f:
        f.write(b"changed")
    r = subprocess.run(PYKVM + ["restore", str(tmp_path / "disk.snap"), "--console", "none"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "changed since the snapshot" in r.stderr, r.stderr


def test_saving_a_running_machine_is_refused():
    m, _ = snapshot_firmware.boot((1000, STEPS))
    try:
        m.start()
        with pytest.raises(SnapshotError, match="running"):
            save_machine("/nonexistent/x.snap", m, machine_devices(m))
        m.stop()
    finally:
        m.close()


def test_saving_over_something_not_a_regular_file_is_refused(tmp_path):
    """A snapshot is written beside its path and renamed over it: over a FIFO or a device node
    (as root: /dev/null itself) that would put a regular file in its place."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    m, _ = snapshot_firmware.boot((1000, STEPS))
    try:
        with pytest.raises(SnapshotError, match="is not a regular file"):
            save_machine(fifo, m, machine_devices(m))
    finally:
        m.close()
    assert fifo.is_fifo()


@pytest.mark.linux
@pytest.mark.parametrize("options, save_at, after", [
    # The Python 8259/8254 and the PIIX IDE disk: saved once the kernel has identified the disk,
    # restored to read its partition table and finish booting.
    ({"irqchip": "user", "disk_bus": "ide"}, r"ata1\.00: ATA-", r"sd 0:0:0:0: \[sda\]"),
    # virtio-blk on the PCI bus: saved after enumeration, restored to probe the disk.
    ({"disk_bus": "virtio-pci"}, r"PCI: Using configuration type 1|pci 0000:00:00\.0",
     r"virtio_blk virtio\d+: \[vda\]"),
    # Two vCPUs: saved before the kernel starts the second one, restored to bring it up (INIT/SIPI
    # through the restored LAPICs; every vCPU's state is in the snapshot).
    ({"cpus": 2}, r"smp: Bringing up secondary CPUs", r"smp: Brought up 1 node, 2 CPUs"),
], ids=["user-irqchip-ide", "virtio-pci", "two-vcpus"])
def test_other_machines_restore_mid_boot(options, save_at, after, tmp_path):
    from pykvm.assets import initramfs, test_kernel
    from pykvm.assets.errors import AssetError
    from pykvm.linux import LinuxVM
    try:
        kernel = test_kernel(build=False)
    except AssetError as e:
        pytest.skip(str(e))
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 << 20))
    path = tmp_path / "vm.snap"
    with LinuxVM(kernel.bzimage, initrd=initramfs(), memory="64M", until=save_at, disk=disk,
                 snapshot=True, append="root=/dev/ram0", **options) as vm:
        stop = vm.run(BOOT_TIMEOUT)
        assert stop.reason == "until", (stop, vm.console.tail())
        vm.save(path)
    log = tmp_path / "console.log"
    r = subprocess.run(PYKVM + ["restore", str(path), "--until", RUN_INIT, "--console", str(log),
                                "--timeout", str(BOOT_TIMEOUT)],
                       capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60)
    text = log.read_text(errors="replace")
    assert r.returncode == 0, (r.stderr, text[-2000:])
    assert re.search(after, text), text[-2000:]
