"""The snapshot file format (pykvm/snapshot/format.py) and the checks that need no /dev/kvm: bad
files are refused with one line, RAM is page-aligned and sparse, disks are fingerprinted."""

from __future__ import annotations

import mmap
import os

import pytest
from hypothesis import given, settings, strategies as st

from pykvm.host.disk import DiskImage
from pykvm.memory import FileBackend
from pykvm.snapshot import Snapshot, SnapshotError, codec
from pykvm.snapshot import format as F
from pykvm.snapshot.machine import check_disk, check_host, disk_fingerprint

PAGE = mmap.PAGESIZE


def make_file(path, ram_pages=(b"\x00" * PAGE, b"A" * PAGE, b"\x00" * (4 << 20), b"B" * 100)):
    ram = b"".join(ram_pages)
    regions = [(0, len(ram) - 100 - (4 << 20) - PAGE), (1 << 32, (4 << 20) + PAGE + 100)]
    meta = {"format": F.FORMAT_VERSION, "config": {"kind": "test"}, "regions": regions,
            "host": {}, "disks": {}, "vcpus": 0}
    sections = {"META": codec.encode(meta), "VCPU": codec.encode([]), "VMST": codec.encode({}),
                "DEVS": codec.encode({"x": {"a": 1}}), "DISK": codec.encode({})}
    views = [memoryview(ram)[:regions[0][1]], memoryview(ram)[regions[0][1]:]]
    F.write(path, sections, views)
    return ram, regions


def test_ram_is_mapped_from_the_file_page_aligned_copy_on_write(tmp_path):
    path = tmp_path / "a.snap"
    ram, regions = make_file(path)
    with Snapshot(path, verify=True) as snap:
        b0 = snap.ram_backend(*regions[0])
        b1 = snap.ram_backend(*regions[1])
    assert bytes(b0.view()) + bytes(b1.view()) == ram
    b1.view()[0:4] = b"XXXX"                       # a private copy of that page
    assert open(path, "rb").read().count(b"XXXX") == 0
    # Zero pages are holes: the file takes less disk than its length.
    st_ = os.stat(path)
    assert st_.st_blocks * 512 < st_.st_size


def test_regions_a_machine_does_not_have_are_refused(tmp_path):
    make_file(tmp_path / "a.snap")
    with Snapshot(tmp_path / "a.snap") as snap, pytest.raises(SnapshotError, match="no RAM region"):
        snap.ram_backend(0, 8192)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:10], "not a pykvm snapshot"),
    (lambda b: b"ELF" + b[3:], "not a pykvm snapshot"),
    (lambda b: b[:8] + (7).to_bytes(4, "little") + b[12:], "version 7 snapshot"),
    (lambda b: b[:40], "truncated"),
    (lambda b: b[:200], "truncated"),
    (lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], "corrupted header"),
])
def test_bad_files_get_one_line(tmp_path, damage, message):
    make_file(tmp_path / "good.snap")
    data = open(tmp_path / "good.snap", "rb").read()
    bad = tmp_path / "bad.snap"
    bad.write_bytes(damage(data))
    with pytest.raises(SnapshotError, match=message) as e:
        Snapshot(bad)
    assert "\n" not in str(e.value)


def test_a_corrupted_section_is_named(tmp_path):
    make_file(tmp_path / "good.snap")
    f = F.SnapshotFile(tmp_path / "good.snap")
    devs = f.entries["DEVS"]
    f.close()
    data = bytearray(open(tmp_path / "good.snap", "rb").read())
    data[devs.offset + 2] ^= 0x40
    (tmp_path / "bad.snap").write_bytes(data)
    with pytest.raises(SnapshotError, match="section 'DEVS' is corrupted"):
        Snapshot(tmp_path / "bad.snap")


def test_corrupted_ram_is_found_when_asked(tmp_path):
    ram, regions = make_file(tmp_path / "good.snap")
    f = F.SnapshotFile(tmp_path / "good.snap")
    at = f.ram_offsets([s for _, s in regions])[0] + PAGE    # the "A" page
    f.close()
    data = bytearray(open(tmp_path / "good.snap", "rb").read())
    data[at] ^= 1
    (tmp_path / "bad.snap").write_bytes(data)
    Snapshot(tmp_path / "bad.snap").close()                 # not checked by default
    with pytest.raises(SnapshotError, match="RAM is corrupted"):
        Snapshot(tmp_path / "bad.snap", verify=True)
    (tmp_path / "short.snap").write_bytes(data[:at])        # RAM cut off
    with pytest.raises(SnapshotError, match="truncated"):
        Snapshot(tmp_path / "short.snap")


def test_another_host_is_refused():
    here = {"machine": "x86_64", "kvm": "KVM-PVM", "cpu_vendor": "AuthenticAMD",
            "cpu_model": "AMD EPYC", "tsc_khz": 2596120, "structs": {"a": 1}}
    check_host(dict(here), here, "s")
    for key, value, message in (("kvm", "AMD-V", "KVM: AMD-V"), ("cpu_vendor", "GenuineIntel", "vendor"),
                                ("structs", {"a": 2}, "struct layout"),
                                ("tsc_khz", 3000000, "3000000 kHz TSC")):
        with pytest.raises(SnapshotError, match=message):
            check_host({**here, key: value}, here, "s")


def test_a_changed_disk_is_refused(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    fp = disk_fingerprint(str(img))
    check_disk(fp)
    with open(img, "r+b") as f:          # same size, same mtime put back: the contents differ
        f.seek(1 << 19)
        f.write(b"changed")
    os.utime(img, ns=(fp["mtime_ns"], fp["mtime_ns"]))
    with pytest.raises(SnapshotError, match="contents differs|changed since"):
        check_disk(fp)
    os.unlink(img)
    with pytest.raises(SnapshotError, match="gone"):
        check_disk(fp)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, (1 << 20) - 100), st.binary(min_size=1, max_size=100)),
                max_size=12))
def test_disk_overlay_round_trip(tmp_path_factory, writes):
    img = tmp_path_factory.mktemp("d") / "disk.img"
    img.write_bytes(bytes(1 << 20))
    a = DiskImage(img, snapshot=True)
    for offset, data in writes:
        a.write(offset, data)
    saved = codec.decode(codec.encode([(o, bytes(d)) for o, d in a.overlay.chunks()]))
    b = DiskImage(img, snapshot=True)
    for offset, data in saved:
        b.overlay.load(offset, data)
    assert b.read(0, 1 << 20) == a.read(0, 1 << 20)
    assert img.read_bytes() == bytes(1 << 20)
    a.close()
    b.close()


def test_file_backend_needs_page_aligned_offsets(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(bytes(3 * PAGE))
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises((ValueError, OSError)):
            FileBackend(fd, 100, PAGE)
        assert bytes(FileBackend(fd, PAGE, PAGE).view()) == bytes(PAGE)
    finally:
        os.close(fd)
