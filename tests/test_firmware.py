"""The firmware programs in firmware/ on /dev/kvm, and the ELF loader that puts them in RAM.

The loader tests need no KVM (GuestMemory.for_test); the rest boot a program from real mode,
let the runtime walk itself up to long mode and CPL3, and check what it reports."""

import shutil
import struct

import pytest

from pykvm.memory import GuestMemory
from pykvm.testing import firmware as F

from conftest import needs_kvm

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("ld") is None,
                                reason="gcc and ld are needed to build firmware/ (Debian: "
                                       "build-essential)")


class PortCounter:
    """A device that counts writes (the exit_storm target)."""

    def __init__(self):
        self.writes = 0

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.writes += 1


# ---------------------------------------------------------------- building

def test_build_is_cached_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("PYKVM_CACHE", str(tmp_path))
    elf = F.build("hello")
    assert elf.is_file() and tmp_path in elf.parents
    assert F.build("hello") == elf          # same inputs: same file, no rebuild
    assert elf.read_bytes()[:4] == b"\x7fELF"


def test_unknown_program_is_a_one_line_error():
    with pytest.raises(F.FirmwareError) as e:
        F.build("no_such_program")
    assert "\n" not in str(e.value) and "hello" in str(e.value)


# ---------------------------------------------------------------- the ELF loader (no KVM)

def test_load_elf_places_segments_and_zeroes_bss():
    mem = GuestMemory.for_test(4 << 20)
    mem.fill(0, 4 << 20, 0xCC)
    entry = F.load_elf(mem, F.build("hello"))
    assert entry == 0x8000
    assert mem.read(0x8000, 1) == b"\xfa"   # cli, the runtime's first instruction
    from elftools.elf.elffile import ELFFile
    with open(F.build("hello"), "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_memsz"] > seg["p_filesz"]:
                tail = seg["p_paddr"] + seg["p_filesz"]
                assert mem.read(tail, seg["p_memsz"] - seg["p_filesz"]) == \
                    bytes(seg["p_memsz"] - seg["p_filesz"])


def _one_line_error(mem, path, *words):
    with pytest.raises(F.FirmwareError) as e:
        F.load_elf(mem, path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_load_elf_rejects_a_non_elf_file(tmp_path):
    p = tmp_path / "firmware.bin"
    p.write_bytes(b"MZ\x90\x00 this is not an ELF file")
    _one_line_error(GuestMemory.for_test(4 << 20), p, "not an ELF")


def test_load_elf_rejects_an_aarch64_elf(tmp_path):
    data = bytearray(F.build("hello").read_bytes())
    struct.pack_into("<H", data, 18, 183)   # e_machine = EM_AARCH64
    p = tmp_path / "arm.elf"
    p.write_bytes(data)
    _one_line_error(GuestMemory.for_test(4 << 20), p, "not an x86-64 ELF", "AARCH64")


def test_load_elf_rejects_a_32_bit_elf(tmp_path):
    data = bytearray(F.build("hello").read_bytes())
    data[4] = 1                             # EI_CLASS = ELFCLASS32 (and the rest no longer fits)
    p = tmp_path / "i386.elf"
    p.write_bytes(data)
    _one_line_error(GuestMemory.for_test(4 << 20), p)


def test_load_elf_rejects_a_segment_outside_ram():
    # The firmware's data segment sits above 1 MiB: 1 MiB of RAM cannot hold it.
    mem = GuestMemory.for_test(1 << 20)
    _one_line_error(mem, F.build("hello"), "outside guest RAM")


def test_load_elf_rejects_a_truncated_file(tmp_path):
    data = F.build("hello").read_bytes()
    p = tmp_path / "short.elf"
    p.write_bytes(data[:0x1100])
    _one_line_error(GuestMemory.for_test(4 << 20), p)


def test_report_reads_the_numbers_after_the_tag_on_its_first_line():
    r = F.FirmwareResult(0, b"virtio_blk: ok setup n=9\n"
                            b"virtio_blk: bench bytes=4096 cycles=77 end=0x1f checksum=0\n"
                            b"virtio_blk: bench bytes=1\n", None)
    assert r.report("virtio_blk: bench") == {"bytes": 4096, "cycles": 77, "checksum": 0}
    assert r.report("virtio_blk: ok") == {"n": 9}
    assert r.report("ata_pio: bench") is None


def test_args_block_layout():
    mem = GuestMemory.for_test(1 << 20)
    F.write_args(mem, cpl=0, args=[7, 2**64 - 1])
    magic, flags, nargs, reserved = struct.unpack_from("<IIII", mem.read(F.ARGS_ADDR, 16))
    assert (magic, flags, nargs, reserved) == (0x41464B50, 1, 2, 0)
    assert struct.unpack("<2Q", mem.read(F.ARGS_ADDR + 16, 16)) == (7, 2**64 - 1)
    assert F.ARGS_SIZE == 128
    with pytest.raises(F.FirmwareError):
        F.write_args(mem, cpl=1)
    with pytest.raises(F.FirmwareError):
        F.write_args(mem, args=range(15))


# ---------------------------------------------------------------- programs on /dev/kvm

@needs_kvm
@pytest.mark.parametrize("cpl", [3, 0])
def test_hello(cpl):
    r = F.run_firmware("hello", cpl=cpl, timeout=20)
    assert r.stop.reason == "exit", r.stop
    assert r.status == 0
    assert r.text == f"Hello from pykvm firmware at CPL{cpl}\n"


@needs_kvm
@pytest.mark.parametrize("cpl", [3, 0])
def test_modes_passes_every_stage(cpl):
    r = F.run_firmware("modes", cpl=cpl, timeout=20)
    assert r.status == 0, r.text
    lines = r.text.splitlines()
    stages = [ln for ln in lines if ln.startswith("stage ")]
    names = ["real mode", "protected mode", "paging", "long mode", "CPL3" if cpl == 3 else "CPL0"]
    assert len(stages) == 5, r.text
    for n, (line, name) in enumerate(zip(stages, names), 1):
        assert line.startswith(f"stage {n} {name}"), line
        assert line.endswith(": ok"), line
    assert lines[-1] == "modes: all stages passed"


@needs_kvm
@pytest.mark.parametrize("cpl,n", [(3, 5000), (0, 2000)])
def test_exit_storm_counts_exactly_n_writes(cpl, n):
    counter = PortCounter()
    r = F.run_firmware("exit_storm", cpl=cpl, args=[n, 0x510], timeout=60,
                       setup=lambda m: m.add_pio(0x510, 1, counter, "counter"))
    assert r.status == 0, (r.stop, r.text)
    assert counter.writes == n
    assert f"{n} writes to port 0x510 at CPL{cpl}" in r.text
    assert r.unclaimed_pio == 0
    assert r.exits["IO"] >= n


@needs_kvm
@pytest.mark.parametrize("kind,vector,name", [(0, 6, "#UD"), (1, 14, "#PF"), (2, 13, "#GP"),
                                              (3, 0, "#DE")])
@pytest.mark.parametrize("cpl", [3, 0])
def test_guest_exception_is_reported(kind, vector, name, cpl):
    r = F.run_firmware("fault", cpl=cpl, args=[kind], timeout=20)
    assert r.status == F.STATUS_EXCEPTION | vector, r.text
    assert r.exception == vector
    assert f"fw: exception {vector} ({name}" in r.text
    assert "no exception was raised" not in r.text


@needs_kvm
def test_without_the_mode_switch_assist_a_refusing_host_fails_at_paging():
    """On a host that refuses the guest's own switch into long mode (KVM-PVM) and a VMM without
    the assist, the runtime stops at stage 3 with a boot-failure status, not a triple fault."""
    from pykvm.devices.debugcon import DebugCon

    with F.firmware_machine() as m:
        out = bytearray()
        m.add_pio(0xE9, 1, DebugCon(out.extend))
        m.add_exit_port()
        F.prepare(m, F.build("hello"))
        m.pio.unregister(F.PORT_ASSIST)
        stop = m.run(timeout=20)
    if stop.status == 0:
        pytest.skip("this host lets the guest enter long mode itself (no KVM-PVM)")
    assert stop.reason == "exit" and stop.status == F.STATUS_BOOT | 3, stop


@needs_kvm
@pytest.mark.parametrize("cpl", [3, 0])
def test_int3_is_reported_as_a_breakpoint(cpl):
    """int3 at CPL3 runs natively; at CPL0 a KVM-PVM host cannot emulate it and pykvm.pvm
    completes it (RIP+1, inject #BP), so the runtime's handler sees vector 3 either way."""
    r = F.run_firmware("fault", cpl=cpl, args=[4], timeout=20, complete_pvm_gaps=True)
    assert r.status == F.STATUS_EXCEPTION | 3, (r.stop, r.text)
    assert "fw: exception 3 (#BP breakpoint)" in r.text


@needs_kvm
def test_tlb_reach_probe_runs_its_chase():
    """bench/tlb_reach.py's guest half: a full cycle through the buffer's pages (no timing here)."""
    import re
    from pykvm.testing.firmware import run_firmware
    r = run_firmware("tlb_reach", args=[16 << 20, 1 << 20, 1000, 2], memory=20 << 20)
    assert r.status == 0, r.text
    m = re.search(r"tlb bytes=(\d+) pages=(\d+) loads=(\d+) best=(\d+) end=(0x[0-9a-f]+)", r.text)
    assert m and (int(m.group(1)), int(m.group(2)), int(m.group(3))) == (1 << 20, 256, 1000)
    end = int(m.group(5), 16)      # a pointer into the buffer, at its page's own line
    assert 16 << 20 <= end < 17 << 20 and end % 4096 == (end // 4096 % 256 * 7 % 64) * 64
