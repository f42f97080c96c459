"""Bus-master IDE DMA (pykvm.devices.ide.bmdma) as libata drives it: PRD tables in a bytes-backed guest
memory, READ/WRITE DMA (EXT), the engine's status bits, IDENTIFY and SET FEATURES, guest mistakes."""

import pytest
from hypothesis import given, settings, strategies as st

from pykvm.bus import Bus
from pykvm.devices.ide import AtaDrive, IdeChannel, PiixIde
from pykvm.host.disk import MemoryDisk
from pykvm.devices.ide.ata import ABRT, DRDY, DRQ, ERR
from pykvm.devices.ide.bmdma import (CMD_START, CMD_WRITE_MEMORY, PRD_EOT, ST_ACTIVE, ST_ERROR,
                                     ST_INTERRUPT)
from pykvm.devices.pci import PciBus
from pykvm.irq import RecordingIrqLine
from pykvm.memory import BytesBackend, GuestMemory, Region

from test_ide import PATTERN, lba28, lba48

READ_DMA, READ_DMA_EXT, WRITE_DMA, WRITE_DMA_EXT = 0xC8, 0x25, 0xCA, 0x35
PRD_TABLE = 0x1000
RAM = 4 << 20


def make(with_dma=True):
    mem = GuestMemory([Region(0, RAM, BytesBackend(RAM))])
    disk = MemoryDisk(len(PATTERN), data=PATTERN)
    irq = RecordingIrqLine()
    primary = IdeChannel(irq, AtaDrive(disk))
    ide = PiixIde(primary, IdeChannel(RecordingIrqLine()), memory=mem if with_dma else None)
    pio = Bus("pio")
    ide.register_on(pio)
    pci = PciBus(pio=pio)
    pci.register_on(pio)
    pci.add(ide)
    bm = ide.bar_address(4)
    return pio, mem, disk, irq, ide, bm


def prd(mem, regions):
    table = b""
    for i, (addr, n) in enumerate(regions):
        flags = (n & 0xFFFF) | (PRD_EOT if i == len(regions) - 1 else 0)
        table += addr.to_bytes(4, "little") + flags.to_bytes(4, "little")
    mem.write(PRD_TABLE, table)


def libata_dma(pio, bm, cmd, lba, count, read, start_first=False, ext=False):
    """ata_bmdma_setup + exec_command + ata_bmdma_start (or START before the command)."""
    pio.write(bm + 4, 4, PRD_TABLE)
    direction = CMD_WRITE_MEMORY if read else 0
    pio.write(bm, 1, direction)
    if start_first:
        pio.write(bm, 1, direction | CMD_START)
    (lba48 if ext else lba28)(pio, cmd, lba, count)
    if not start_first:
        pio.write(bm, 1, pio.read(bm, 1) | CMD_START)


def libata_interrupt(pio, bm):
    """ata_bmdma_port_intr: engine status, stop, ATA status, clear the engine's INTERRUPT/ERROR."""
    host_stat = pio.read(bm + 2, 1)
    pio.write(bm, 1, pio.read(bm, 1) & ~CMD_START)
    status = pio.read(0x1F7, 1)
    pio.write(bm + 2, 1, pio.read(bm + 2, 1))
    return host_stat, status


@pytest.mark.parametrize("start_first", [False, True])
@pytest.mark.parametrize("ext", [False, True])
def test_read_dma_scatters_into_the_prd_regions(start_first, ext):
    pio, mem, disk, irq, ide, bm = make()
    regions = [(0x20000, 4096), (0x40000, 512), (0x30000, 3584)]      # 8 KiB = 16 sectors
    prd(mem, regions)
    libata_dma(pio, bm, READ_DMA_EXT if ext else READ_DMA, 100, 16, read=True,
               start_first=start_first, ext=ext)
    assert irq.level
    got = b"".join(mem.read(a, n) for a, n in regions)
    assert got == PATTERN[100 * 512:116 * 512]
    host_stat, status = libata_interrupt(pio, bm)
    assert host_stat & ST_INTERRUPT and not host_stat & (ST_ACTIVE | ST_ERROR)
    assert status == DRDY | 0x10 and not irq.level
    assert pio.read(bm + 2, 1) & (ST_INTERRUPT | ST_ERROR) == 0       # cleared by writing 1s


def test_write_dma_gathers_from_memory():
    pio, mem, disk, irq, ide, bm = make()
    data = bytes((i * 7) & 0xFF for i in range(64 * 1024 + 1024))    # a 64 KiB entry (count 0)
    mem.write(0x100000, data[:65536])
    mem.write(0x200000, data[65536:])
    prd(mem, [(0x100000, 0), (0x200000, 1024)])
    libata_dma(pio, bm, WRITE_DMA_EXT, 7, len(data) // 512, read=False, ext=True)
    host_stat, status = libata_interrupt(pio, bm)
    assert host_stat == ST_INTERRUPT and not status & ERR
    assert bytes(disk.buf[7 * 512:7 * 512 + len(data)]) == data
    assert ide.primary.bus_master.transfers == 1


def test_a_short_table_is_an_error_not_a_hang():
    pio, mem, disk, irq, ide, bm = make()
    prd(mem, [(0x20000, 1024)])                  # 2 sectors of table for 4 sectors
    libata_dma(pio, bm, READ_DMA, 0, 4, read=True)
    host_stat, status = libata_interrupt(pio, bm)
    assert host_stat & ST_ERROR and host_stat & ST_INTERRUPT
    assert status & ERR and pio.read(0x1F1, 1) == ABRT
    assert ide.primary.bus_master.errors == 1


def test_a_table_outside_ram_is_an_error():
    pio, mem, disk, irq, ide, bm = make()
    prd(mem, [(RAM + 0x1000, 512)])
    libata_dma(pio, bm, WRITE_DMA, 0, 1, read=False)
    host_stat, status = libata_interrupt(pio, bm)
    assert host_stat & ST_ERROR and status & ERR
    assert bytes(disk.buf[:512]) == PATTERN[:512]       # nothing written


def test_a_longer_table_keeps_active_beside_interrupt():
    pio, mem, disk, irq, ide, bm = make()
    prd(mem, [(0x20000, 8192)])
    libata_dma(pio, bm, READ_DMA, 0, 1, read=True)
    host_stat = pio.read(bm + 2, 1)
    assert host_stat & ST_INTERRUPT and host_stat & ST_ACTIVE     # [BMIDE 3.1]
    assert mem.read(0x20000, 512) == PATTERN[:512]


def test_the_engine_waits_for_start_and_the_drive_for_the_engine():
    pio, mem, disk, irq, ide, bm = make()
    prd(mem, [(0x20000, 512)])
    pio.write(bm + 4, 4, PRD_TABLE)
    lba28(pio, READ_DMA, 3, 1)
    assert pio.read(0x3F6, 1) & DRQ and not irq.level        # waiting for START
    assert pio.read(0x1F0, 2) == 0xFFFF                      # no PIO data in a DMA command
    pio.write(bm, 1, CMD_WRITE_MEMORY | CMD_START)
    assert irq.level and mem.read(0x20000, 512) == PATTERN[3 * 512:4 * 512]


def test_identify_and_set_features_offer_multiword_dma_only_with_the_engine():
    for with_dma in (True, False):
        pio, mem, disk, irq, ide, bm = make(with_dma)
        assert (bm is not None) == with_dma
        pio.write(0x1F7, 1, 0xEC)
        ident = [pio.read(0x1F0, 2) for _ in range(256)]
        assert bool(ident[49] & (1 << 8)) == with_dma
        assert ident[63] == (0x0007 if with_dma else 0) and ident[88] == 0
        pio.write(0x1F1, 1, 0x03)                   # SET FEATURES: transfer mode
        pio.write(0x1F2, 1, 0x22)                   # multiword DMA mode 2
        pio.write(0x1F7, 1, 0xEF)
        assert bool(pio.read(0x1F7, 1) & ERR) != with_dma
        lba28(pio, READ_DMA, 0, 1)                  # a DMA command without the engine: ABRT
        assert bool(pio.read(0x1F7, 1) & ERR) != with_dma
    pio, mem, disk, irq, ide, bm = make()
    pio.write(0x1F1, 1, 0x03)
    pio.write(0x1F2, 1, 0x22)
    pio.write(0x1F7, 1, 0xEF)
    pio.write(0x1F7, 1, 0xEC)
    ident = [pio.read(0x1F0, 2) for _ in range(256)]
    assert ident[63] == 0x0407                      # mode 2 selected


@settings(max_examples=50, deadline=None)
@given(data=st.binary(min_size=8, max_size=64), writes=st.lists(
    st.tuples(st.integers(0, 15), st.integers(0, 255), st.integers(1, 4)), max_size=30))
def test_fuzzed_engine_registers_never_raise(data, writes):
    """Whatever a guest writes to the engine and the PRD table, the VMM goes on."""
    pio, mem, disk, irq, ide, bm = make()
    mem.write(PRD_TABLE, data)
    lba28(pio, READ_DMA, 0, 2)
    for offset, value, size in writes:
        pio.write(bm + offset, size, value * 0x01010101 & ((1 << (8 * size)) - 1))
        pio.read(bm + offset, size)
    pio.write(bm + 4, 4, PRD_TABLE)
    pio.write(bm, 1, CMD_START | CMD_WRITE_MEMORY)
