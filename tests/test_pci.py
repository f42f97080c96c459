"""PCI: configuration mechanism #1, BAR sizing and moves, capabilities, INTx."""

from hypothesis import given, settings, strategies as st

from pykvm.bus import Bus
from pykvm.devices.pci import PciBus, PciDevice
from pykvm.irq import RecordingIrqLine
from pykvm.x86 import layout


class Toy(PciDevice):
    def __init__(self):
        super().__init__(0x1AF4, 0x1041, 0x020000, revision=1, subsystem_vendor_id=0x1AF4,
                         subsystem_id=1, interrupt_pin=1)
        self.add_bar(0, 0x100, "io")
        self.add_bar(1, 0x1000, "mem32")
        self.add_bar(2, 0x4000, "mem64", prefetchable=True)
        self.writes = []

    def bar_read(self, index, offset, size):
        return (index << 16) | offset

    def bar_write(self, index, offset, size, value):
        self.writes.append((index, offset, size, value))


def make():
    pio, mmio = Bus("pio"), Bus("mmio")
    changes = []
    pci = PciBus(mmio=mmio, pio=pio, on_bar_change=lambda *a: changes.append(a))
    pci.register_on(pio)
    dev = Toy()
    line = RecordingIrqLine()
    slot = pci.add(dev, irq=5, irq_line=line)
    return pci, pio, mmio, dev, slot, line, changes


def cfg_addr(slot, reg, fn=0, bus=0):
    return 0x80000000 | bus << 16 | slot << 11 | fn << 8 | reg


def cfg_read(pio, slot, reg, size=4, fn=0):
    pio.write(0xCF8, 4, cfg_addr(slot, reg & 0xFC, fn))
    return pio.read(0xCFC + (reg & 3), size)


def cfg_write(pio, slot, reg, size, value, fn=0):
    pio.write(0xCF8, 4, cfg_addr(slot, reg & 0xFC, fn))
    pio.write(0xCFC + (reg & 3), size, value)


def test_linux_type1_probe_and_host_bridge():
    _, pio, *_ = make()
    pio.write(0xCFB, 1, 0x01)                 # byte access: not CONFIG_ADDRESS
    pio.write(0xCF8, 4, 0x80000000)
    assert pio.read(0xCF8, 4) == 0x80000000
    assert cfg_read(pio, 0, 0) == 0x12378086
    assert cfg_read(pio, 0, 0x08) >> 8 == 0x060000
    pio.write(0xCF8, 4, 0xFFFFFFFF)
    assert pio.read(0xCF8, 4) == 0x80FFFFFC   # reserved bits read 0


def test_empty_slot_other_bus_and_disabled_read_all_ones():
    _, pio, *_ = make()
    assert cfg_read(pio, 7, 0) == 0xFFFFFFFF
    pio.write(0xCF8, 4, cfg_addr(0, 0, bus=1))
    assert pio.read(0xCFC, 4) == 0xFFFFFFFF
    pio.write(0xCF8, 4, 0x00000000)           # enable bit clear
    assert pio.read(0xCFC, 2) == 0xFFFF


def test_partial_accesses_in_the_data_window():
    _, pio, _, dev, slot, *_ = make()
    assert cfg_read(pio, slot, 0x00, 2) == 0x1AF4
    assert cfg_read(pio, slot, 0x02, 2) == 0x1041
    assert cfg_read(pio, slot, 0x03, 1) == 0x10
    assert cfg_read(pio, slot, 0x0B, 1) == 0x02   # base class
    assert cfg_read(pio, slot, 0x3D, 1) == 1      # INTA#
    assert cfg_read(pio, slot, 0x3C, 1) == 5
    cfg_write(pio, slot, 0x0D, 1, 0x40)            # latency timer (byte 1 of dword 0x0c)
    assert cfg_read(pio, slot, 0x0C, 4) >> 8 & 0xFF == 0x40
    # A word at 0xcfe reaches bytes 2-3; a dword at 0xcfd spills past 0xcff and reads ones there.
    assert cfg_read(pio, slot, 0x02, 2) == 0x1041
    pio.write(0xCF8, 4, cfg_addr(slot, 0))
    assert pio.read(0xCFD, 4) == 0xFF10411A
    # Read-only registers ignore writes.
    cfg_write(pio, slot, 0x00, 4, 0)
    assert cfg_read(pio, slot, 0) == 0x10411AF4


def test_firmware_assignment_and_bar_windows():
    pci, pio, mmio, dev, slot, line, changes = make()
    io = dev.bar_address(0)
    m32 = dev.bar_address(1)
    m64 = dev.bar_address(2)
    assert 0xC000 <= io < 0x10000 and io % 0x100 == 0
    assert layout.PCI_MMIO_BASE <= m32 < layout.PCI_MMIO_END and m32 % 0x1000 == 0
    assert layout.PCI_MMIO_BASE <= m64 < layout.PCI_MMIO_END and m64 % 0x4000 == 0
    assert cfg_read(pio, slot, 0x04, 2) & 0x3 == 0x3
    assert pio.read(io + 4, 1) == 4
    assert mmio.read(m64 + 0x10, 4) == (2 << 16) | 0x10
    mmio.write(m32 + 8, 4, 0xABCD)
    assert dev.writes == [(1, 8, 4, 0xABCD)]
    assert {c[1] for c in changes} == {0, 1, 2}


def test_bar_sizing_as_linux_does_it():
    pci, pio, mmio, dev, slot, line, changes = make()
    cmd = cfg_read(pio, slot, 0x04, 2)
    cfg_write(pio, slot, 0x04, 2, cmd & ~0x3)     # __pci_read_base disables decoding first
    assert dev.bar_address(1) is None and mmio.ranges() == []
    sizes = {}
    for i, reg in enumerate(range(0x10, 0x28, 4)):
        orig = cfg_read(pio, slot, reg)
        cfg_write(pio, slot, reg, 4, 0xFFFFFFFF)
        sizes[i] = cfg_read(pio, slot, reg)
        cfg_write(pio, slot, reg, 4, orig)
    assert sizes[0] == 0x0000FF01                 # I/O, 256 ports, 16 decoded bits
    assert sizes[1] == 0xFFFFF000                 # 32-bit memory, 4 KiB
    assert sizes[2] == 0xFFFFC00C                 # 64-bit prefetchable, 16 KiB ...
    assert sizes[3] == 0xFFFFFFFF                 # ... whose upper half is all address
    assert sizes[4] == 0 and sizes[5] == 0        # unimplemented BARs are read-only 0
    assert cfg_read(pio, slot, 0x30) == 0         # no expansion ROM
    cfg_write(pio, slot, 0x04, 2, cmd)
    assert dev.bar_address(1) is not None


def test_guest_moves_a_bar_and_callbacks_follow():
    pci, pio, mmio, dev, slot, line, changes = make()
    old = dev.bar_address(1)
    changes.clear()
    cfg_write(pio, slot, 0x14, 4, 0xF0000000)
    assert changes == [(dev, 1, old, 0xF0000000)]
    assert mmio.find(old) is None
    assert mmio.read(0xF0000000 + 4, 4) == (1 << 16) | 4
    cfg_write(pio, slot, 0x04, 2, 0)             # decoding off: every window goes
    assert {(c[1], c[3]) for c in changes[1:]} == {(0, None), (1, None), (2, None)}
    assert mmio.ranges() == [] and pio.find(0xCF8) is not None and len(pio.ranges()) == 1


def test_bar_moved_onto_another_is_a_guest_error_not_a_crash():
    pci, pio, mmio, dev, slot, *_ = make()
    other = dev.bar_address(2)
    cfg_write(pio, slot, 0x14, 4, other)
    assert pci.bar_conflicts == 1
    cfg_write(pio, slot, 0x14, 4, 0xF0000000)
    assert mmio.find(0xF0000000) is not None


def test_status_write_one_to_clear_and_intx():
    pci, pio, mmio, dev, slot, line, _ = make()
    dev.set_irq(True)
    assert line.level and cfg_read(pio, slot, 0x06, 2) & 0x08
    cfg_write(pio, slot, 0x04, 2, cfg_read(pio, slot, 0x04, 2) | 0x400)   # INTx disable
    assert not line.level and cfg_read(pio, slot, 0x06, 2) & 0x08
    cfg_write(pio, slot, 0x04, 2, cfg_read(pio, slot, 0x04, 2) & ~0x400)
    assert line.level
    dev.set_irq(False)
    assert not line.level
    dev.config[0x07] |= 0x20                     # received master abort (bit 13)
    cfg_write(pio, slot, 0x06, 2, 0x0008)         # writing the read-only bit does nothing
    assert cfg_read(pio, slot, 0x06, 2) & 0x2000
    cfg_write(pio, slot, 0x06, 2, 0x2000)
    assert not cfg_read(pio, slot, 0x06, 2) & 0x2000


def test_capability_list():
    dev = PciDevice(0x1AF4, 0x1000, 0xFF0000)
    a = dev.add_capability(0x09, bytes([14, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
    b = dev.add_capability(0x11, bytes(10), wmask=bytes([0, 0xC0] + [0] * 8))
    assert dev.config[0x34] == a == 0x40
    assert dev.config[a + 1] == b and dev.config[b + 1] == 0 and b % 4 == 0
    assert dev.get16(0x06) & 0x10
    assert dev.capabilities() == [(a, 0x09), (b, 0x11)]
    dev.config_write(b + 2, 2, 0xFFFF)
    assert dev.get16(b + 2) == 0xC000


def test_multifunction_and_reset_port():
    resets = []
    pio = Bus("pio")
    pci = PciBus(pio=pio, on_reset=lambda: resets.append(1))
    pci.register_on(pio)
    f0 = PciDevice(0x8086, 0x7000, 0x060100)
    f1 = PciDevice(0x8086, 0x7010, 0x010180)
    slot = pci.add(f0)
    pci.add(f1, slot=slot, function=1)
    assert cfg_read(pio, slot, 0x0E, 1) & 0x80
    assert cfg_read(pio, slot, 0x00, fn=1) == 0x70108086
    pio.write(0xCF9, 1, 0x02)
    assert not resets
    pio.write(0xCF9, 1, 0x06)
    assert resets == [1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFF), st.integers(0, 0xFFFFFFFF), st.booleans()),
                max_size=40))
def test_fuzz_config_space(seq):
    pci, pio, mmio, dev, slot, line, _ = make()
    for port_off, size, reg, value, is_write in seq:
        if port_off < 4:
            pio.write(0xCF8, 4, cfg_addr(slot if value & 1 else 0, reg & 0xFC))
            continue
        if is_write:
            pio.write(0xCF8 + port_off, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= pio.read(0xCF8 + port_off, size) < 1 << (8 * size)
        # Read-only identity never changes; BAR type bits never change; windows match the BARs.
        assert dev.get32(0) == 0x10411AF4 and pci.host_bridge.get32(0) == 0x12378086
        assert dev.get32(0x10) & 3 == 1 and dev.get32(0x14) & 0xF == 0 and dev.get32(0x18) & 0xF == 0xC
        for i in range(3):
            addr = dev.bar_address(i)
            bus = pio if i == 0 else mmio
            if addr is not None and pci.bar_conflicts == 0:
                r = bus.find(addr)
                assert r is not None and r.device.device is dev and r.device.index == i
        mapped = sum(1 for r in mmio.ranges()) + len(pio.ranges()) - 1
        assert mapped <= 3


def test_sizing_with_decode_on_never_maps_the_all_ones_pattern():
    pci, pio, mmio, dev, slot, line, changes = make()
    cfg_write(pio, slot, 0x14, 4, 0xFFFFFFFF)
    cfg_write(pio, slot, 0x10, 4, 0xFFFFFFFF)
    assert dev.bar_address(1) is None and dev.bar_address(0) is None
    assert mmio.find(0xFFFFF000) is None and pio.find(0xFF00) is None
