"""Multiboot (v1) kernels: the loader without KVM (header, image formats, modules, information
block), and pykvm's own multiboot kernel (firmware/multiboot/mbcheck.c) booted by `pykvm boot`,
checking what it was given and ending through isa-debug-exit with the status the shell sees."""

import os
import re
import shutil
import struct
import subprocess
import sys

import pytest

from pykvm.boot import BootError
from pykvm.boot import multiboot as MB
from pykvm.memory import GuestMemory
from pykvm.x86 import layout

from conftest import needs_kvm

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("objcopy") is None,
                               reason="gcc, ld and objcopy build firmware/multiboot (Debian: "
                                      "build-essential)")


def kernel(fmt="elf32"):
    from pykvm.testing.multiboot import build
    return build("mbcheck", fmt)


def header(flags=0x3, checksum=None, fields=(), at=0, size=64):
    data = bytearray(size)
    if checksum is None:
        checksum = -(MB.HEADER_MAGIC + flags) & 0xFFFFFFFF
    struct.pack_into("<III", data, at, MB.HEADER_MAGIC, flags, checksum)
    for i, v in enumerate(fields):
        struct.pack_into("<I", data, at + 12 + 4 * i, v)
    return data


def aout_image(load_addr=0x100000, header_off=0, body=b"\x90" * 64, load_end=0, bss_end=0,
               entry=None, header_addr=None):
    """A flat multiboot image with the address fields (flag 16): the header, then `body`."""
    header_addr = load_addr + header_off if header_addr is None else header_addr
    entry = load_addr + 32 if entry is None else entry
    data = header(0x10003, fields=(header_addr, load_addr, load_end, bss_end, entry),
                  at=header_off, size=header_off + 32)
    return bytes(data) + body


def _one_line(exc, *words):
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


# ---------------------------------------------------------------- the header (3.1)

def test_header_is_found_at_any_aligned_offset_in_the_first_8k():
    img = bytes(4096) + header(at=0)
    h = MB.find_header(img)
    assert h.offset == 4096 and h.flags == 3
    assert MB.find_header(bytes(8192) + header()) is None       # past the first 8 KiB
    assert MB.find_header(bytes(2) + header()) is None           # not 4-byte aligned


def test_bad_checksum_alone_is_a_malformed_header():
    with pytest.raises(BootError) as e:
        MB.find_header(header(checksum=1))
    _one_line(e, "malformed multiboot header", "checksum")
    assert MB.is_multiboot(header(checksum=1))      # so the CLI routes it here and says why


def test_unknown_required_flags_are_refused():
    mem = GuestMemory.for_test(8 << 20)
    with pytest.raises(BootError) as e:
        MB.load_multiboot(mem, bytes(header(flags=0x13)), name="k")
    _one_line(e, "0x10", "3.1.2")


# ---------------------------------------------------------------- the a.out kludge (3.1.3)

def test_aout_kludge_loads_at_load_addr_and_zeroes_bss():
    mem = GuestMemory.for_test(8 << 20)
    mem.fill(0x100000, 0x1000, 0xCC)
    img = aout_image(body=b"\xf4" * 32, bss_end=0x100000 + 0x200)
    plan = MB.load_multiboot(mem, img, name="k")
    assert plan.entry == 0x100020 and (plan.kernel_start, plan.kernel_end) == (0x100000, 0x100200)
    assert mem.read(0x100000, 4) == struct.pack("<I", MB.HEADER_MAGIC)
    assert mem.read(0x100020, 32) == b"\xf4" * 32
    assert mem.read(0x100040, 0x1c0) == bytes(0x1c0)


def test_aout_kludge_header_later_in_the_file():
    # The header at file offset 0x40 and header_addr load+0x40: the file's byte 0 goes to load.
    img = bytearray(aout_image(header_off=0x40))
    img[0:4] = b"HEAD"
    mem = GuestMemory.for_test(8 << 20)
    MB.load_multiboot(mem, bytes(img), name="k")
    assert mem.read(0x100000, 4) == b"HEAD"


@pytest.mark.parametrize("kw,words", [
    (dict(header_addr=0xFFFFF), "load_addr"),                   # load above the header
    (dict(header_addr=0x100000 + 0x1000), "before the start"),  # reaches before the file
    (dict(load_end=0x100000 + 0x10000), "file has"),            # more than the file holds
    (dict(load_end=0xFFF00), "below load_addr"),
    (dict(bss_end=0x100001), "bss_end_addr"),
    (dict(entry=0x200000), "entry_addr"),
    (dict(load_addr=0x8000, header_addr=0x8000), "below 1 MiB"),
    (dict(load_addr=0x10000000, header_addr=0x10000000, entry=0x10000020), "not in guest RAM"),
])
def test_malformed_address_fields_are_one_line_errors(kw, words):
    with pytest.raises(BootError) as e:
        MB.load_multiboot(GuestMemory.for_test(8 << 20), aout_image(**kw), name="k")
    _one_line(e, words)


# ---------------------------------------------------------------- ELF, modules, info block (3.3)

@needs_gcc
@pytest.mark.parametrize("fmt", ["elf32", "elf64"])
def test_elf_kernel_is_loaded_by_physical_address(fmt):
    mem = GuestMemory.for_test(16 << 20)
    img = kernel(fmt).read_bytes()
    plan = MB.load_multiboot(mem, img, name="k")
    assert plan.kernel_start == 0x100000 and plan.description["format"] == f"multiboot {fmt.upper()}"
    h = MB.find_header(img)
    assert mem.read(0x100000, 12) == img[h.offset:h.offset + 12]    # .multiboot comes first


def test_info_block_fields_point_where_they_say():
    mem = GuestMemory.for_test(64 << 20)
    mods = [MB.Module(b"first", "a.bin"), MB.Module(bytes(5000), "b.bin x=1 y")]
    plan = MB.load_multiboot(mem, aout_image(), name="kern.elf", append="quiet  v=2", modules=mods)
    base = plan.info_gpa
    assert base == layout.MULTIBOOT_INFO
    rd = lambda off: struct.unpack("<I", mem.read(base + off, 4))[0]    # noqa: E731
    cstr = lambda gpa: mem.read(gpa, 256).split(b"\0")[0].decode()      # noqa: E731
    assert rd(0) & 0x24D == 0x24D
    assert cstr(rd(16)) == "kern.elf quiet  v=2"
    assert (rd(4), rd(8)) == (layout.EBDA_START // 1024, (64 << 20) // 1024 - 1024)
    entries = [struct.unpack("<IQQI", mem.read(rd(48) + i, 24)) for i in range(0, rd(44), 24)]
    assert entries == [(20, 0, layout.EBDA_START, 1), (20, 0x100000, (64 << 20) - 0x100000, 1)]
    assert rd(20) == 2
    got = [struct.unpack("<IIII", mem.read(rd(24) + 16 * i, 16)) for i in range(2)]
    for (start, end, string, _), m in zip(got, mods):
        assert start % 4096 == 0 and start >= plan.kernel_end
        assert mem.read(start, end - start) == m.data and cstr(string) == m.string
    assert got[1][0] >= got[0][1]
    assert cstr(rd(64)) == "pykvm"


def test_modules_that_do_not_fit_are_one_line_errors():
    mem = GuestMemory.for_test(4 << 20)
    with pytest.raises(BootError) as e:
        MB.load_multiboot(mem, aout_image(), name="k",
                          modules=[MB.Module(bytes(2 << 20), "a"), MB.Module(bytes(2 << 20), "big")])
    _one_line(e, "do not fit", "'big'", "--memory")


# ---------------------------------------------------------------- booting it (pykvm boot)

def pykvm(*args, timeout=120):
    p = subprocess.run([sys.executable, "-m", "pykvm.cli", "boot", *args], capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def _sum(data: bytes) -> int:
    s = 0
    for b in data:
        s = (s * 31 + b) & 0xFFFFFFFF
    return s


@needs_kvm
@needs_gcc
@pytest.mark.parametrize("fmt", ["elf32", "elf64", "aout"])
def test_mbcheck_sees_its_modules_command_line_and_memory(tmp_path, fmt):
    mod1, mod2 = tmp_path / "one.bin", tmp_path / "two.bin"
    mod1.write_bytes(b"module one\n")
    mod2.write_bytes(os.urandom(9000))
    k = kernel(fmt)
    p = pykvm(str(k), "--append", "exit=0x21 mods=2", "--initrd", str(mod1),
              "--module", f"{mod2},two args", "--debug-exit", "--memory", "48M",
              "--fw-cfg", "name=opt/pykvm/greeting,string=hello fw_cfg", "--console", "stdio")
    out = p.stdout
    assert "mbcheck: all checks passed" in out, out + p.stderr
    assert p.returncode == (0x21 << 1) | 1                      # what QEMU's isa-debug-exit gives
    assert f"cmdline {k} exit=0x21 mods=2\n" in out              # the program's name first
    assert f"mem_upper {((48 << 20) - (1 << 20)) // 1024:#x}\n" in out
    assert f"module {11:#x} {_sum(mod1.read_bytes()):#x} {mod1}\n" in out
    assert f"module {9000:#x} {_sum(mod2.read_bytes()):#x} {mod2} two args\n" in out
    assert "fw_cfg signature 0x554d4551\nfw_cfg cpus 0x1\n" in out
    assert f"fw_cfg ram {48 << 20:#x}\n" in out and "fw_cfg greeting hello fw_cfg\n" in out
    assert "fw_cfg dma status 0x0\nfw_cfg dma greeting hello fw_cfg\n" in out    # the DMA way


@needs_kvm
@needs_gcc
def test_a_failed_check_is_a_different_status(tmp_path):
    # mods=3 but none given: check 9 fails, the kernel writes 0x89 -> status (0x89 << 1 | 1) & 0xff.
    p = pykvm(str(kernel()), "--append", "mods=3", "--debug-exit", "--console", "stdio")
    assert "FAIL check 0x9" in p.stdout
    assert p.returncode == ((0x89 << 1) | 1) & 0xFF


@needs_kvm
@needs_gcc
@pytest.mark.parametrize("option", [["--console", "/dev/full"],
                                    ["--trace", "/dev/full", "--console", "none"]])
def test_cli_a_console_or_trace_file_the_host_cannot_write_stops_the_run_in_one_line(option):
    """/dev/full answers every write with ENOSPC, as a full disk does: the run stops (status 1,
    a host failure) with one line naming the file, not a traceback out of a device's write."""
    p = pykvm(str(kernel()), "--append", "exit=0x21", "--debug-exit", *option)
    what = "--console /dev/full" if option[0] == "--console" else "the exit trace"
    assert p.returncode == 1, p.stderr
    assert f"pykvm: stopped: error: cannot write {what}: No space left on device" in p.stderr


def test_cli_malformed_header_is_a_one_line_error(tmp_path):
    k = tmp_path / "bad.elf"
    k.write_bytes(bytes(header(checksum=0x1234)) + bytes(4096))
    p = pykvm(str(k), "--console", "none")
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("pykvm: error:")]
    assert p.returncode == 2 and len(lines) == 1 and "malformed multiboot header" in lines[0]


@needs_kvm
@needs_gcc
def test_cli_modules_that_do_not_fit(tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(20 << 20)
    p = pykvm(str(kernel()), "--module", str(big), "--module", f"{big},again", "--memory", "32M",
              "--console", "none")
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("pykvm: error:")]
    assert p.returncode == 2 and len(lines) == 1 and "do not fit" in lines[0], p.stderr


def test_cli_module_with_a_linux_kernel_is_a_usage_error(tmp_path):
    k = tmp_path / "kernel"
    k.write_bytes(b"\0" * 4096)
    p = pykvm(str(k), "--module", str(k), "--console", "none")
    assert p.returncode == 2 and "--module is for multiboot kernels" in p.stderr


@needs_gcc
@pytest.mark.parametrize("option", [["DISK"], ["--rng"], ["--save-to", "vm.snap"]])
def test_cli_linux_only_options_with_a_multiboot_kernel_are_one_line_errors(tmp_path, option):
    args = [str(tmp_path / "disk.img") if a == "DISK" else a for a in option]
    if option == ["DISK"]:
        (tmp_path / "disk.img").write_bytes(bytes(4096))
    p = pykvm(str(kernel()), *args, "--console", "none")
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("pykvm: error:")]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "not supported with a multiboot kernel" in lines[0], p.stderr


@needs_kvm
@needs_gcc
def test_testdev_scratch_and_bochs_shutdown_from_a_guest():
    p = pykvm(str(kernel()), "--append", "testdev=1 bochs=1", "--testdev", "--debug-exit",
              "--console", "stdio")
    assert "testdev scratch 0x12345678\n" in p.stdout and "all checks passed" in p.stdout, p.stdout
    assert p.returncode == 0 and "stopped: poweroff" in p.stderr, p.stderr   # not isa-debug-exit


@needs_kvm
@needs_gcc
def test_without_testdev_the_scratch_port_reads_as_nothing():
    p = pykvm(str(kernel()), "--append", "testdev=1", "--debug-exit", "--console", "stdio")
    assert "FAIL check 0xc" in p.stdout and p.returncode == ((0x8C << 1) | 1) & 0xFF, p.stdout


@needs_kvm
@needs_gcc
@needs_kvm
@needs_gcc
def test_library_a_bad_until_pattern_fails_before_a_machine_is_built():
    """The pattern is compiled after the machine exists: checked first, no VM is left open (it
    was: a re.error, and the VM's file descriptors and guest RAM never released)."""
    from pykvm.cli_checks import InputError
    from pykvm.multiboot_vm import MultibootVM
    k = kernel()
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(InputError, match=r"^until '\(' is not a valid regular expression"):
        MultibootVM(k, until="(")
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_library_multiboot_vm_takes_the_machine_config_linux_vm_takes():
    """MultibootVM(machine=MachineConfig(...)), as `pykvm boot` builds it for either kind of
    kernel: the memory and vCPU count reach the guest (its info block and fw_cfg)."""
    from pykvm.config import MachineConfig
    from pykvm.multiboot_vm import MultibootVM
    from pykvm.testdevs import add_test_devices
    machine = MachineConfig(memory="40M", cpus=2)
    with MultibootVM(kernel(), append="exit=0x21", machine=machine) as vm:
        add_test_devices(vm.machine, debug_exit=(0xF4, 4))
        stop = vm.run(timeout=120)
        out = vm.console.text
    assert stop.reason == "debug-exit" and stop.status == (0x21 << 1) | 1, (stop, out)
    assert f"mem_upper {((40 << 20) - (1 << 20)) // 1024:#x}\n" in out, out
    assert "fw_cfg cpus 0x2\n" in out, out
    with pytest.raises(TypeError):
        MultibootVM(kernel(), machine=machine, memory="64M")
