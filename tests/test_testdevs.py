"""The QEMU-compatible test devices without KVM: isa-debug-exit, fw_cfg (legacy and DMA),
pc-testdev, the Bochs shutdown port; and their wiring and parsing."""

import re
import struct
from pathlib import Path

import pytest

from pykvm.bus import Bus
from pykvm.devices import fw_cfg as F
from pykvm.devices.bochs_shutdown import BochsShutdown
from pykvm.devices.debug_exit import IsaDebugExit, exit_status, parse_spec
from pykvm.devices.pc_testdev import FlushPage, IoMem, IrqLines, Scratch32
from pykvm.irq import RecordingIrqLine
from pykvm.memory import GuestMemory


# ---------------------------------------------------------------- isa-debug-exit

@pytest.mark.parametrize("value,status", [(0, 1), (1, 3), (0x21, 0x43), (0x7F, 0xFF),
                                          (0xFFFFFFFF, 0x1FFFFFFFF)])
def test_debug_exit_status_is_qemus(value, status):
    seen = []
    dev = IsaDebugExit(seen.append)
    dev.write(0, 4, value)
    assert seen == [status] and dev.value == value
    assert exit_status(value) == status


def test_debug_exit_keeps_only_the_access_width():
    seen = []
    IsaDebugExit(seen.append).write(0, 1, 0x1234)
    assert seen == [0x69]       # (0x34 << 1) | 1


@pytest.mark.parametrize("text,expected", [(None, (0xF4, 4)), ("", (0xF4, 4)), ("0x501", (0x501, 4)),
                                           ("0x501,2", (0x501, 2)), ("244,1", (0xF4, 1))])
def test_debug_exit_spec(text, expected):
    assert parse_spec(text) == expected


@pytest.mark.parametrize("text,words", [("x", "PORT[,SIZE]"), ("0xf4,3", "1, 2 or 4"),
                                        ("0x10000", "not an I/O port"), ("0xffff,4", "past")])
def test_debug_exit_bad_spec_is_one_line(text, words):
    with pytest.raises(ValueError) as e:
        parse_spec(text)
    assert words in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- fw_cfg, legacy interface

def _read_item(dev, key, n):
    dev.write(0, 2, key)
    return bytes(dev.read(1, 1) for _ in range(n))


def test_fw_cfg_signature_id_ram_and_cpus():
    dev = F.FwCfg(ram_size=256 << 20, cpus=3)
    assert _read_item(dev, F.FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert struct.unpack("<I", _read_item(dev, F.FW_CFG_ID, 4))[0] == F.FW_CFG_VERSION  # no DMA
    assert struct.unpack("<Q", _read_item(dev, F.FW_CFG_RAM_SIZE, 8))[0] == 256 << 20
    assert struct.unpack("<H", _read_item(dev, F.FW_CFG_NB_CPUS, 2))[0] == 3
    assert struct.unpack("<H", _read_item(dev, F.FW_CFG_MAX_CPUS, 2))[0] == 3


def test_fw_cfg_reads_zero_past_the_end_and_selecting_rewinds():
    dev = F.FwCfg(ram_size=1 << 20)
    assert _read_item(dev, F.FW_CFG_SIGNATURE, 6) == b"QEMU\0\0"
    assert _read_item(dev, F.FW_CFG_SIGNATURE, 2) == b"QE"     # rewound by the selector write
    assert _read_item(dev, 0x1234, 3) == bytes(3)                # no such item: empty
    dev.write(0, 2, F.FW_CFG_SIGNATURE)
    assert dev.read(1, 4) == int.from_bytes(b"QEMU", "little")   # wide reads: a substring


def test_fw_cfg_data_writes_are_ignored():
    dev = F.FwCfg(ram_size=1 << 20)
    dev.write(0, 2, F.FW_CFG_SIGNATURE | F.FW_CFG_WRITE_CHANNEL)
    dev.write(1, 1, ord("X"))
    assert _read_item(dev, F.FW_CFG_SIGNATURE, 4) == b"QEMU"


def test_fw_cfg_file_directory_names_each_file():
    dev = F.FwCfg(ram_size=1 << 20)
    assert _read_item(dev, F.FW_CFG_FILE_DIR, 4) == bytes(4)     # empty directory: count 0
    k1 = dev.add_file("opt/pykvm/a", b"hello")
    k2 = dev.add_file("opt/b", bytes(range(200)))
    directory = _read_item(dev, F.FW_CFG_FILE_DIR, 4 + 2 * 64)
    assert struct.unpack(">I", directory[:4])[0] == 2
    entries = [struct.unpack(">IHH56s", directory[4 + 64 * i:4 + 64 * (i + 1)]) for i in range(2)]
    assert [(size, key, name.rstrip(b"\0")) for size, key, _, name in entries] == \
        [(5, k1, b"opt/pykvm/a"), (200, k2, b"opt/b")]
    assert k1 == F.FW_CFG_FILE_FIRST
    assert _read_item(dev, k2, 200) == bytes(range(200))


@pytest.mark.parametrize("name,words", [("etc/e820", "opt/"), ("opt/" + "x" * 60, "longer")])
def test_fw_cfg_refuses_names_qemu_reserves_or_too_long(name, words):
    with pytest.raises(F.FwCfgError) as e:
        F.FwCfg(ram_size=1 << 20).add_file(name, b"")
    assert words in str(e.value)


def test_fw_cfg_refuses_a_duplicate_name():
    dev = F.FwCfg(ram_size=1 << 20)
    dev.add_file("opt/x", b"1")
    with pytest.raises(F.FwCfgError):
        dev.add_file("opt/x", b"2")


def test_fw_cfg_constants_match_the_kernel_header():
    header = Path("/usr/include/linux/qemu_fw_cfg.h")
    if not header.is_file():
        pytest.skip("linux/qemu_fw_cfg.h is not installed (Debian: linux-libc-dev)")
    defines = dict(re.findall(r"#define\s+(FW_CFG_\w+)\s+(0x[0-9a-fA-F]+|\d+)", header.read_text()))
    names = [n for n in dir(F) if n.startswith("FW_CFG_") and n in defines]
    assert len(names) >= 20
    for n in names:
        assert getattr(F, n) == int(defines[n].rstrip("ULul"), 0), n


# ---------------------------------------------------------------- fw_cfg, DMA interface

def _dma(dev, mem, desc_at, control, length, address):
    mem.write(desc_at, struct.pack(">IIQ", control, length, address))
    # As Linux does it: iowrite32be(high) to 0x514, iowrite32be(low) to 0x518; iowrite32be puts the
    # big-endian bytes on the bus, so the port value is the byte-swapped address half.
    swap = lambda v: int.from_bytes(v.to_bytes(4, "big"), "little")  # noqa: E731
    dev.write(4, 4, swap(desc_at >> 32))
    dev.write(8, 4, swap(desc_at & 0xFFFFFFFF))
    return struct.unpack(">I", mem.read(desc_at, 4))[0]


def test_fw_cfg_dma_select_and_read():
    mem = GuestMemory.for_test(1 << 20)
    dev = F.FwCfg(ram_size=mem.size, mem=mem)
    assert struct.unpack("<I", _read_item(dev, F.FW_CFG_ID, 4))[0] == 3
    key = dev.add_file("opt/data", b"0123456789")
    control = (key << 16) | F.FW_CFG_DMA_CTL_SELECT | F.FW_CFG_DMA_CTL_READ
    assert _dma(dev, mem, 0x1000, control, 4, 0x2000) == 0
    assert mem.read(0x2000, 4) == b"0123"
    assert _dma(dev, mem, 0x1000, F.FW_CFG_DMA_CTL_SKIP, 2, 0) == 0
    assert _dma(dev, mem, 0x1000, F.FW_CFG_DMA_CTL_READ, 6, 0x2000) == 0
    assert mem.read(0x2000, 6) == b"6789\0\0"      # the rest, then zeros past the end
    assert dev.dma_transfers == 3


def test_fw_cfg_dma_write_and_bad_buffer_set_the_error_bit():
    mem = GuestMemory.for_test(1 << 20)
    dev = F.FwCfg(ram_size=mem.size, mem=mem)
    key = dev.add_file("opt/data", b"abcd")
    assert _dma(dev, mem, 0x1000, (key << 16) | 0x08 | F.FW_CFG_DMA_CTL_WRITE, 4, 0x2000) == 1
    assert _dma(dev, mem, 0x1000, (key << 16) | 0x08 | F.FW_CFG_DMA_CTL_READ, 4, 1 << 30) == 1
    assert dev.errors == 2 and _read_item(dev, key, 4) == b"abcd"


def test_fw_cfg_dma_register_reads_the_signature():
    dev = F.FwCfg(ram_size=1 << 20, mem=GuestMemory.for_test(1 << 20))
    raw = dev.read(4, 4).to_bytes(4, "little") + dev.read(8, 4).to_bytes(4, "little")
    assert raw == b"QEMU CFG"


# ---------------------------------------------------------------- pc-testdev, Bochs shutdown

def test_testdev_scratch_is_byte_addressed():
    s = Scratch32()
    s.write(0, 4, 0x11223344)
    assert s.read(0, 4) == 0x11223344 and s.read(1, 2) == 0x2233 and s.read(3, 1) == 0x11
    s.write(2, 1, 0xAA)
    assert s.read(0, 4) == 0x11AA3344


def test_testdev_irq_lines_follow_writes():
    lines = [RecordingIrqLine() for _ in range(24)]
    dev = IrqLines(lines)
    dev.write(10, 1, 1)
    dev.write(10, 1, 0)
    dev.write(3, 1, 7)
    assert lines[10].history == [True, False] and lines[3].level and lines[3].edges == 1
    dev.write(30, 1, 1)         # beyond the 24 lines: ignored
    assert not any(line.level for i, line in enumerate(lines) if i != 3)


def test_testdev_iomem_and_flush():
    mem = IoMem()
    mem.write(0x100, 8, 0x0102030405060708)
    assert mem.read(0x100, 8) == 0x0102030405060708 and mem.read(0x103, 1) == 0x05
    flush = FlushPage()
    flush.write(0, 4, 0x12345)
    assert flush.pages == [0x12000]


def test_bochs_shutdown_needs_the_whole_word():
    calls = []
    dev = BochsShutdown(lambda: calls.append(1))
    for ch in b"ShutSShutdow":
        dev.write(0, 1, ch)
    assert calls == []
    dev.write(0, 1, ord("n"))
    assert calls == [1]
    dev.write(0, 4, int.from_bytes(b"Shut", "little"))
    dev.write(0, 4, int.from_bytes(b"down", "little"))
    assert calls == [1, 1]


# ---------------------------------------------------------------- wiring (a bus, no KVM)

class FakeMachine:
    """What add_test_devices uses of a Machine."""

    def __init__(self):
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.mem = GuestMemory.for_test(1 << 20)
        self.irqchip = "none"
        self.stops = []

    def add_pio(self, base, length, device, name=None):
        self.pio.register(base, length, device, name)

    def add_mmio(self, base, length, device, name=None):
        self.mmio.register(base, length, device, name)

    def request_stop(self, stop):
        self.stops.append(stop)


def test_wiring_debug_exit_replaces_the_exit_port_and_stops_with_qemus_status():
    from pykvm.devices.debugcon import ExitPort
    from pykvm.testdevs import add_test_devices
    m = FakeMachine()
    m.add_pio(0xF4, 1, ExitPort(), "exit port")
    m.add_pio(0xE9, 1, ExitPort(), "debugcon")
    add_test_devices(m, debug_exit=(0xF4, 4), testdev=True, fw_cfg_files=[("opt/x", b"hi")])
    m.pio.write(0x510, 2, 0x20)
    assert m.pio.read(0x511, 1) == ord("h")
    m.pio.write(0xE0, 4, 0xCAFE)
    assert m.pio.read(0xE8, 1) == 0xFE
    for ch in b"Shutdown":
        m.pio.write(0x8900, 1, ch)
    m.pio.write(0xF6, 1, 0x10)
    assert [(s.reason, s.status) for s in m.stops] == [("poweroff", None), ("debug-exit", 0x21)]


def test_wiring_debug_exit_overlapping_another_device_is_an_error():
    from pykvm.machine import MachineError
    from pykvm.testdevs import add_test_devices
    m = FakeMachine()
    m.add_pio(0x3F8, 8, object(), "COM1 16550A")
    with pytest.raises(MachineError, match="overlaps COM1"):
        add_test_devices(m, debug_exit=(0x3FC, 4))


@pytest.mark.parametrize("spec,expected", [("name=opt/a,string=xyz", ("opt/a", b"xyz")),
                                           ("opt/a,string=", ("opt/a", b""))])
def test_parse_fw_cfg(spec, expected):
    from pykvm.testdevs import parse_fw_cfg
    assert parse_fw_cfg(spec) == expected


def test_parse_fw_cfg_file(tmp_path):
    from pykvm.testdevs import parse_fw_cfg
    (tmp_path / "f").write_bytes(b"\x00\x01")
    assert parse_fw_cfg(f"name=opt/f,file={tmp_path / 'f'}") == ("opt/f", b"\x00\x01")


@pytest.mark.parametrize("spec,words", [("name=opt/a", "one of"), ("opt/a,file=/nonexistent/x", "does not exist"),
                                        ("opt/a,path=x", "unknown key"),
                                        ("opt/a,file=x,string=y", "one of")])
def test_parse_fw_cfg_errors_are_one_line(spec, words):
    from pykvm.machine import MachineError
    from pykvm.testdevs import parse_fw_cfg
    with pytest.raises(MachineError) as e:
        parse_fw_cfg(spec)
    assert words in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- snapshot state (pykvm.devices.state)

def _round_trip(make, poke):
    a = make()
    poke(a)
    b = make()
    b.restore_state(a.save_state())
    assert b.save_state() == a.save_state()
    return a, b


def test_state_round_trips():
    seen = []
    _, dx = _round_trip(lambda: IsaDebugExit(seen.append), lambda d: d.write(0, 4, 9))
    assert dx.value == 9
    _, bs = _round_trip(lambda: BochsShutdown(lambda: None),
                        lambda d: [d.write(0, 1, c) for c in b"Shut"])
    for ch in b"down":
        bs.write(0, 1, ch)
    mem = GuestMemory.for_test(1 << 20)

    def make_fw():
        dev = F.FwCfg(ram_size=1 << 20, mem=mem)
        dev.add_file("opt/x", b"abcdef")
        return dev

    def poke_fw(dev):
        dev.write(0, 2, F.FW_CFG_FILE_FIRST)
        dev.read(1, 1)
        dev.read(1, 1)
        dev.write(4, 4, 0x12345678)          # half a DMA address
    _, fw = _round_trip(make_fw, poke_fw)
    assert fw.read(1, 1) == ord("c") and bytes(fw._dma_addr[:4]) == (0x12345678).to_bytes(4, "little")
    _, sc = _round_trip(Scratch32, lambda d: d.write(0, 4, 0xDEADBEEF))
    assert sc.read(0, 4) == 0xDEADBEEF
    _, io = _round_trip(IoMem, lambda d: d.write(8, 4, 0x01020304))
    assert io.read(8, 4) == 0x01020304


def test_irq_lines_state_comes_back_without_new_edges():
    old = [RecordingIrqLine() for _ in range(24)]
    dev = IrqLines(old)
    dev.write(5, 1, 1)
    new = [RecordingIrqLine() for _ in range(24)]
    twin = IrqLines(new)
    twin.restore_state(dev.save_state())
    assert new[5].level and new[5].history == []        # restored silently
    twin.write(5, 1, 0)
    assert new[5].history == [False]
