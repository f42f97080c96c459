"""Tests for pykvm.assets: the cpio writer/reader, the cache, the kernel config, and the real assets.

The cpio and cache tests need nothing. The asset tests fetch Debian packages
with apt (quick once cached) and skip with the reason when the archive cannot
be reached; the test-kernel checks run only if the kernel is already built
(``python -m pykvm.assets test-kernel`` takes minutes).
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.assets import (AssetError, DISK_MARKER, USERLAND_MARKER, cloud_kernel, disk_image,
                          initramfs, test_kernel)
from pykvm.assets.__main__ import main as cli_main
from pykvm.assets.cache import cache_key, cached
from pykvm.assets.cpio import HEADER_SIZE, MAGIC, TRAILER, CpioEntry, CpioError, read_cpio, write_cpio
from pykvm.assets.kernel import fragment_bytes, parse_config, unmet_options
from pykvm.assets.userland import INIT_SCRIPT, POWEROFF_ARG

# --- cpio -------------------------------------------------------------------

_segment = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0/"),
                   min_size=1, max_size=12).filter(lambda s: s != TRAILER)
_name = st.lists(_segment, min_size=1, max_size=4).map("/".join)
_perm = st.integers(0, 0o7777)


@st.composite
def _entry(draw) -> CpioEntry:
    kind = draw(st.sampled_from(["file", "dir", "symlink", "chr"]))
    name = draw(_name)
    if kind == "file":
        e = CpioEntry.file(name, draw(st.binary(max_size=300)), draw(_perm))
    elif kind == "dir":
        e = CpioEntry.directory(name, draw(_perm))
    elif kind == "symlink":
        e = CpioEntry.symlink(name, draw(_name))
    else:
        e = CpioEntry.char_device(name, draw(st.integers(0, 4095)), draw(st.integers(0, 2**20)), draw(_perm))
    return CpioEntry(e.name, e.mode, e.data, uid=draw(st.integers(0, 2**32 - 1)),
                     gid=draw(st.integers(0, 65535)), mtime=draw(st.integers(0, 2**32 - 1)), rdev=e.rdev)


@given(st.lists(_entry(), max_size=12))
def test_cpio_round_trip(entries):
    assert read_cpio(write_cpio(entries)) == entries


def _member_offsets(archive: bytes) -> list[tuple[int, str]]:
    """Walk the archive by hand (not with the module's parser): (offset, name) of each member."""
    out, off = [], 0
    while True:
        assert archive[off:off + 6] == MAGIC, f"no magic at {off}"
        namesize = int(archive[off + 94:off + 102], 16)
        filesize = int(archive[off + 54:off + 62], 16)
        name = archive[off + HEADER_SIZE:off + HEADER_SIZE + namesize - 1].decode()
        out.append((off, name))
        if name == TRAILER:
            return out
        off += HEADER_SIZE + namesize
        off += -off % 4
        off += filesize
        off += -off % 4


@given(st.lists(_entry(), max_size=8))
def test_cpio_alignment_and_trailer(entries):
    archive = write_cpio(entries)
    members = _member_offsets(archive)
    assert all(off % 4 == 0 for off, _ in members)
    assert [n for _, n in members] == [e.name for e in entries] + [TRAILER]
    last_off = members[-1][0]
    # The trailer's header + "TRAILER!!!\0" (11 bytes) padded to 4, and nothing after it.
    assert len(archive) == last_off + HEADER_SIZE + 11 + (-(HEADER_SIZE + 11) % 4)
    assert len(archive) % 4 == 0


def test_cpio_header_layout():
    archive = write_cpio([CpioEntry.file("init", b"#!/bin/sh\n", 0o755)])
    header = archive[:HEADER_SIZE].decode()
    assert header.startswith("070701")
    fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
    ino, mode, uid, gid, nlink, mtime, size, _, _, _, _, namesize, check = fields
    assert (mode, nlink, size, namesize, check) == (0o100755, 1, 10, 5, 0)
    assert archive[HEADER_SIZE:HEADER_SIZE + 5] == b"init\0"
    assert archive[HEADER_SIZE + 5:116] == b"\0"  # 110 + 5 = 115, padded to 116
    assert archive[116:126] == b"#!/bin/sh\n"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_cpio_readable_by_gnu_cpio(tmp_path):
    entries = [CpioEntry.directory("dev"), CpioEntry.char_device("dev/console", 5, 1),
               CpioEntry.directory("bin"), CpioEntry.file("bin/busybox", b"\x7fELF" + bytes(1000), 0o755),
               CpioEntry.symlink("bin/sh", "busybox"), CpioEntry.file("odd", b"abc")]
    archive = write_cpio(entries)
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=archive,
                   cwd=tmp_path, check=True)
    assert (tmp_path / "bin/busybox").read_bytes() == b"\x7fELF" + bytes(1000)
    assert (tmp_path / "bin/busybox").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "odd").read_bytes() == b"abc"
    assert (tmp_path / "bin/sh").readlink() == Path("busybox")
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=archive, capture_output=True,
                             check=True).stdout.decode()
    assert "5,   1" in listing.splitlines()[1] and listing.splitlines()[1].startswith("c")


@pytest.mark.parametrize("name", ["", "/abs", "a\0b", TRAILER])
def test_cpio_rejects_bad_names(name):
    with pytest.raises(CpioError):
        write_cpio([CpioEntry.file(name, b"x")])


def test_cpio_rejects_data_on_directories():
    with pytest.raises(CpioError):
        write_cpio([CpioEntry(name="d", mode=stat.S_IFDIR | 0o755, data=b"x")])


def test_cpio_reader_rejects_damage():
    archive = write_cpio([CpioEntry.file("ab", b"hello")])
    assert read_cpio(archive)[0].data == b"hello"
    with pytest.raises(CpioError, match="truncated|TRAILER"):
        read_cpio(archive[:-20])
    with pytest.raises(CpioError):
        read_cpio(b"070702" + archive[6:])
    with pytest.raises(CpioError, match="padding"):
        bad = bytearray(archive)
        bad[HEADER_SIZE + 3] = 1  # in the padding after "ab\0" (110 + 3 -> 116)
        read_cpio(bytes(bad))
    with pytest.raises(CpioError):
        read_cpio(b"")


# --- cache ------------------------------------------------------------------

_inputs = st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=8), st.binary(max_size=8),
                                                         st.integers(0, 1000)), max_size=5)


@given(_inputs, st.text(max_size=8), st.one_of(st.text(max_size=8), st.binary(max_size=8)))
def test_cache_key_changes_with_any_input(inputs, name, value):
    changed = {**inputs, name: value}
    if inputs.get(name) == value and type(inputs.get(name)) is type(value):
        assert cache_key("a", changed) == cache_key("a", inputs)
    else:
        assert cache_key("a", changed) != cache_key("a", inputs)


@given(_inputs)
def test_cache_key_ignores_order_and_depends_on_asset(inputs):
    reordered = dict(reversed(list(inputs.items())))
    assert cache_key("a", reordered) == cache_key("a", inputs)
    assert cache_key("b", inputs) != cache_key("a", inputs)


def test_cache_key_distinguishes_types_and_boundaries():
    assert cache_key("a", {"x": "1"}) != cache_key("a", {"x": 1})
    assert cache_key("a", {"x": "1"}) != cache_key("a", {"x": b"1"})
    assert cache_key("a", {"ab": "c"}) != cache_key("a", {"a": "bc"})
    assert cache_key("a", {"fragment": b"CONFIG_X=y\n"}) != cache_key("a", {"fragment": b"CONFIG_X=n\n"})


def test_cached_builds_once_and_atomically(tmp_path):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "out").write_text("done")

    first = cached("thing", {"v": "1"}, build, root=tmp_path)
    again = cached("thing", {"v": "1"}, build, root=tmp_path)
    assert first == again and len(calls) == 1
    assert (first / "out").read_text() == "done" and (first / "inputs.json").is_file()
    other = cached("thing", {"v": "2"}, build, root=tmp_path)
    assert other != first and len(calls) == 2

    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached("thing", {"v": "3"}, broken, root=tmp_path)
    left = sorted(p.name for p in (tmp_path / "thing").iterdir() if not p.name.endswith(".lock"))
    assert left == sorted([first.name, other.name])  # no half-built entry, no temporary directory


def test_cached_second_builder_waits_for_the_first(tmp_path):
    import threading

    started, release = threading.Event(), threading.Event()
    calls = []

    def slow(tmp: Path) -> None:
        calls.append("slow")
        started.set()
        assert release.wait(10)
        (tmp / "out").write_text("slow")

    def fast(tmp: Path) -> None:
        calls.append("fast")
        (tmp / "out").write_text("fast")

    results = {}
    first = threading.Thread(target=lambda: results.setdefault("a", cached("k", {"v": 1}, slow, root=tmp_path)))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: results.setdefault("b", cached("k", {"v": 1}, fast, root=tmp_path)))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # blocked on the lock, not building
    release.set()
    first.join(10)
    second.join(10)
    assert calls == ["slow"] and results["a"] == results["b"]
    assert (results["b"] / "out").read_text() == "slow"


def test_cache_env_variable(tmp_path, monkeypatch):
    from pykvm.assets.cache import cache_root
    monkeypatch.setenv("PYKVM_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("PYKVM_CACHE")
    assert cache_root() == Path.home() / ".cache" / "pykvm"


def test_cli_error_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PYKVM_CACHE", str(blocker))
    assert cli_main(["initramfs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pykvm: error: ") and "Traceback" not in "\n".join(err)


# --- kernel config ------------------------------------------------------------

def test_parse_config_and_unmet_options():
    config = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=15\nCONFIG_S="-x"\n# comment\n'
    assert parse_config(config) == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_N": "15", "CONFIG_S": '"-x"'}
    fragment = 'CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_N=14\nCONFIG_S="-x"\n'
    assert unmet_options(fragment, config) == ["CONFIG_B=y (got n)", "CONFIG_N=14 (got 15)"]


def test_kernel_key_covers_fragment_settings_not_comments():
    from pykvm.assets.kernel import fragment_options

    a = fragment_options("# why\nCONFIG_B=y\nCONFIG_A=y\n")
    assert a == fragment_options("CONFIG_A=y\n\n# other words\nCONFIG_B=y\n")
    assert a != fragment_options("CONFIG_A=y\n# CONFIG_B is not set\n")
    assert cache_key("test-kernel", {"fragment": a}) != cache_key(
        "test-kernel", {"fragment": fragment_options("CONFIG_A=y\nCONFIG_B=m\n")})


def test_fragment_asks_for_what_pykvm_needs():
    frag = parse_config(fragment_bytes().decode())
    for needed in ["64BIT", "SERIAL_8250_CONSOLE", "PCI", "VIRTIO_MMIO", "VIRTIO_MMIO_CMDLINE_DEVICES",
                   "VIRTIO_PCI", "VIRTIO_BLK", "VIRTIO_NET", "IP_PNP", "VIRTIO_CONSOLE", "HW_RANDOM_VIRTIO",
                   "ATA_PIIX", "BLK_DEV_SD", "EXT4_FS", "BLK_DEV_INITRD", "RD_GZIP", "DEVTMPFS_MOUNT",
                   "PROC_FS", "SYSFS", "BINFMT_ELF", "BINFMT_SCRIPT", "PVH", "EARLY_PRINTK",
                   # --cpus N, the ACPI tables (and --no-acpi's MP table), gdb reading kernel structures
                   "SMP", "ACPI", "X86_MPPARSE", "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT"]:
        assert frag.get(f"CONFIG_{needed}") == "y", needed
    for harmful in ["MODULES", "PTP_1588_CLOCK_KVM", "RANDOMIZE_BASE", "UNWINDER_ORC", "FTRACE", "KPROBES",
                    "KVM_GUEST"]:
        assert frag.get(f"CONFIG_{harmful}") == "n", harmful


# --- real assets (Debian packages) ------------------------------------------------

def _or_skip(fetch):
    try:
        return fetch()
    except AssetError as e:
        pytest.skip(f"asset unavailable: {e}")


def test_initramfs_has_init_shell_and_console():
    path = _or_skip(initramfs)
    assert path.name == "initramfs.cpio"
    entries = {e.name: e for e in read_cpio(path.read_bytes())}
    init = entries["init"]
    assert init.is_file and init.mode & 0o111 and init.data == INIT_SCRIPT.encode()
    assert USERLAND_MARKER in init.data.decode() and POWEROFF_ARG in init.data.decode()
    assert entries["bin/sh"].is_symlink and entries["bin/sh"].data == b"/bin/busybox"
    # the other applets' links are made by /init (INITRAMFS_APPLETS): not unpacked by the kernel
    assert "sbin/poweroff" not in entries and "busybox --install -s" in init.data.decode()
    busybox = entries["bin/busybox"]
    assert busybox.is_file and busybox.data[:4] == b"\x7fELF" and len(busybox.data) > 500_000
    assert entries["dev/console"].is_char_device and entries["dev/console"].rdev == (5, 1)
    assert entries["dev/null"].rdev == (1, 3)
    # parents come before children, as the kernel needs when unpacking
    seen = set()
    for name in entries:
        parent = name.rpartition("/")[0]
        assert not parent or parent in seen, name
        seen.add(name)
    assert initramfs() == path  # cached: same path again


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_initramfs_init_links_the_applets_it_uses(tmp_path):
    """/init's first step, run natively in a chroot of the unpacked archive: the applets it and
    the tests use (mount, grep, poweroff, setsid, cttyhack) exist afterwards as busybox links."""
    path = _or_skip(initramfs)
    for e in read_cpio(path.read_bytes()):
        target = tmp_path / e.name
        if e.is_dir:
            target.mkdir(parents=True, exist_ok=True)
        elif e.is_symlink:
            target.symlink_to(e.data.decode())
        elif e.is_file:
            target.write_bytes(e.data)
            target.chmod(e.mode & 0o777)
    line = next(ln for ln in INIT_SCRIPT.splitlines() if "--install" in ln)
    r = subprocess.run(["chroot", str(tmp_path), "/bin/sh", "-c", line], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for applet in ("bin/mount", "bin/grep", "sbin/poweroff", "usr/bin/setsid", "bin/cttyhack",
                   "bin/cat", "bin/uname"):
        assert os.readlink(tmp_path / applet) == "/bin/busybox", applet


def test_compressed_initramfs_is_the_same_archive_gzipped():
    packed = _or_skip(lambda: initramfs(compress=True))
    assert packed.name == "initramfs.cpio.gz" and packed.parent != initramfs().parent
    assert gzip.decompress(packed.read_bytes()) == initramfs().read_bytes()


@pytest.mark.skipif(shutil.which("debugfs") is None and not Path("/sbin/debugfs").exists(),
                    reason="e2fsprogs not installed")
def test_disk_image_is_clean_ext4_with_busybox():
    path = _or_skip(disk_image)
    assert path.stat().st_size == 64 * 1024 * 1024
    fsck = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /etc/pykvm-disk", str(path)], capture_output=True, text=True)
    assert cat.stdout.strip() == DISK_MARKER
    stat_sh = subprocess.run(["debugfs", "-R", "stat /bin/sh", str(path)], capture_output=True, text=True)
    assert "Type: symlink" in stat_sh.stdout and "/bin/busybox" in stat_sh.stdout
    stat_init = subprocess.run(["debugfs", "-R", "stat /init", str(path)], capture_output=True, text=True)
    assert "Type: regular" in stat_init.stdout


def test_cloud_kernel_is_a_bzimage():
    path = _or_skip(cloud_kernel)
    head = path.read_bytes()[:0x300]
    assert head[0x202:0x206] == b"HdrS"  # boot protocol magic
    assert path.name.startswith("vmlinuz-") and "cloud-amd64" in path.name


def test_built_test_kernel():
    k = _or_skip(lambda: test_kernel(build=False))
    from elftools.elf.elffile import ELFFile

    assert k.bzimage.read_bytes()[0x202:0x206] == b"HdrS"
    assert k.release.startswith("6.1.") and k.release.endswith("-pykvm")
    assert unmet_options(fragment_bytes().decode(), k.config.read_text()) == []
    with open(k.vmlinux, "rb") as f:
        elf = ELFFile(f)
        notes = [(n["n_name"], n["n_type"]) for seg in elf.iter_segments()
                 if seg["p_type"] == "PT_NOTE" for n in seg.iter_notes()]
    assert ("Xen", 18) in notes, notes  # XEN_ELFNOTE_PHYS32_ENTRY: the PVH entry point


# --- the tiny init ------------------------------------------------------------

def test_tiny_initramfs_holds_only_console_and_init():
    from pykvm.assets.userland import TINY_MESSAGE
    entries = {e.name: e for e in read_cpio(initramfs(tiny=True).read_bytes())}
    assert set(entries) == {"dev", "dev/console", "init"}
    init = entries["init"].data
    assert init[:4] == b"\x7fELF" and len(init) < 300 and init.endswith(TINY_MESSAGE.encode())
    assert entries["dev/console"].rdev == (5, 1)


def test_tiny_init_is_a_valid_static_elf(tmp_path):
    from elftools.elf.elffile import ELFFile
    from pykvm.assets.tinyinit import LOAD_ADDRESS, tiny_init

    path = tmp_path / "init"
    path.write_bytes(tiny_init("hello\n"))
    with open(path, "rb") as f:
        elf = ELFFile(f)
        assert (elf["e_type"], elf["e_machine"]) == ("ET_EXEC", "EM_X86_64")
        (seg,) = list(elf.iter_segments())
        assert seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] == LOAD_ADDRESS
        assert seg["p_filesz"] == path.stat().st_size
        assert LOAD_ADDRESS <= elf["e_entry"] < LOAD_ADDRESS + seg["p_filesz"]


@pytest.mark.skipif(shutil.which("setpriv") is None or __import__("platform").machine() != "x86_64",
                    reason="needs x86-64 Linux and setpriv (util-linux)")
def test_tiny_init_prints_then_tries_to_power_off():
    """Run it on the host with no capabilities at all, so its reboot() fails with EPERM."""
    import os
    import tempfile

    from pykvm.assets.tinyinit import tiny_init

    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # reachable by `nobody`
        os.chmod(d, 0o755)
        path = Path(d) / "init"
        path.write_bytes(tiny_init("pykvm: hello from tiny init\n"))
        path.chmod(0o755)
        # Never let this reach reboot() with CAP_SYS_BOOT: as root, drop every capability
        # and become nobody first; a non-root user has no CAP_SYS_BOOT to begin with.
        argv = [str(path)]
        if os.geteuid() == 0:
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                    "--bounding-set=-all", "--no-new-privs", *argv]
        proc = subprocess.run(argv, capture_output=True, timeout=10)
    assert proc.stdout == b"pykvm: hello from tiny init\n"
    assert proc.returncode == 1  # reboot() refused, then exit(1)


# --- Debian ---------------------------------------------------------------------

def test_missing_host_packages_without_root_name_the_command(monkeypatch):
    from pykvm.assets import debian

    monkeypatch.setattr(debian, "_is_root", lambda: False)
    with pytest.raises(AssetError) as e:
        debian.ensure_host_packages(["coreutils", "pykvm-no-such-package"], "test this")
    msg = str(e.value)
    assert "\n" not in msg and "sudo apt-get install -y --no-install-recommends pykvm-no-such-package" in msg
    assert "coreutils" not in msg.split("`")[1]  # installed packages are not asked for
    debian.ensure_host_packages(["coreutils"], "test this")  # all present: nothing to do


def test_cloud_metapackage_resolves_to_a_versioned_image():
    import re

    from pykvm.assets import debian

    package, version = _or_skip(lambda: debian.resolve_metapackage("linux-image-cloud-amd64"))
    assert re.fullmatch(r"linux-image-6\.1\.0-\d+-cloud-amd64", package), package
    assert version.startswith("6.1.")


def test_cli_print_path_prints_only_paths(capsys):
    assert cli_main(["--print-path", "tiny-initramfs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and Path(out[0]).is_file() and out[0].endswith("initramfs-tiny.cpio")


def test_cli_rejects_unknown_assets():
    with pytest.raises(SystemExit) as e:
        cli_main(["initramfs", "bogus"])
    assert e.value.code == 2
