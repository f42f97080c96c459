"""IDE/ATA: IDENTIFY words, PIO reads and writes, errors, reset signature, absent drives, fuzzing."""


from hypothesis import given, settings, strategies as st

from pykvm.bus import Bus
from pykvm.devices.ide import AtaDrive, IdeChannel, PiixIde
from pykvm.host.disk import MemoryDisk
from pykvm.devices.ide.ata import ABRT, BSY, DRDY, DRQ, ERR, IDNF
from pykvm.devices.pci import PciBus
from pykvm.host.disk import DiskImage
from pykvm.irq import RecordingIrqLine

SECTORS = 2048          # 1 MiB
# Every sector different (its number in the first bytes), built once: the fuzzer makes many disks.
PATTERN = b"".join(n.to_bytes(4, "little") + bytes(range(4, 256)) + bytes(range(256))
                   for n in range(SECTORS))


def make(slave=False, readonly=False):
    disk = MemoryDisk(len(PATTERN), readonly=readonly, data=PATTERN)
    drive = AtaDrive(disk, serial="SN123", model="PYKVM TEST DISK")
    other = AtaDrive(MemoryDisk(64 * 512)) if slave else None
    irq14, irq15 = RecordingIrqLine(), RecordingIrqLine()
    primary = IdeChannel(irq14, drive, other)
    secondary = IdeChannel(irq15)
    ide = PiixIde(primary, secondary)
    pio = Bus("pio")
    ide.register_on(pio)
    return pio, drive, disk, irq14, ide


def words(pio, n=256, port=0x1F0):
    return [pio.read(port, 2) for _ in range(n)]


def to_bytes(ws):
    return b"".join(w.to_bytes(2, "little") for w in ws)


def ata_string(ws):
    return b"".join(w.to_bytes(2, "big") for w in ws).decode().strip()


def lba28(pio, cmd, lba, count, dev=0):
    pio.write(0x1F2, 1, count & 0xFF)
    pio.write(0x1F3, 1, lba & 0xFF)
    pio.write(0x1F4, 1, (lba >> 8) & 0xFF)
    pio.write(0x1F5, 1, (lba >> 16) & 0xFF)
    pio.write(0x1F6, 1, 0xE0 | dev << 4 | (lba >> 24) & 0xF)
    pio.write(0x1F7, 1, cmd)


def lba48(pio, cmd, lba, count):
    for reg, hi, lo in ((2, count >> 8, count), (3, lba >> 24, lba), (4, lba >> 32, lba >> 8),
                        (5, lba >> 40, lba >> 16)):
        pio.write(0x1F0 + reg, 1, hi & 0xFF)
        pio.write(0x1F0 + reg, 1, lo & 0xFF)
    pio.write(0x1F6, 1, 0x40)
    pio.write(0x1F7, 1, cmd)


def test_identify_words_libata_reads():
    pio, drive, _, irq, _ = make()
    pio.write(0x1F6, 1, 0xA0)
    pio.write(0x1F7, 1, 0xEC)
    assert irq.level
    assert pio.read(0x1F7, 1) & (DRQ | DRDY | BSY | ERR) == DRQ | DRDY
    assert not irq.level                      # the status read acknowledged INTRQ
    w = words(pio)
    assert pio.read(0x3F6, 1) & DRQ == 0
    assert w[0] & 0x8000 == 0                 # ATA device
    assert ata_string(w[27:47]) == "PYKVM TEST DISK"
    assert ata_string(w[10:20]) == "SN123"
    assert w[49] & (1 << 9)                   # LBA
    assert w[60] | w[61] << 16 == SECTORS     # LBA28 capacity
    assert w[83] & 0xC000 == 0x4000 and w[83] & (1 << 10)      # ata_id_has_lba48
    assert w[86] & (1 << 10) and w[87] & 0xC000 == 0x4000     # ata_id_lba48_enabled
    assert w[100] | w[101] << 16 | w[102] << 32 | w[103] << 48 == SECTORS
    assert w[83] & (1 << 12) and w[83] & (1 << 13)            # FLUSH CACHE (EXT)
    assert w[47] & 0xFF == 16 and w[47] >> 8 == 0x80
    assert w[53] & 2 and w[64] & 3 == 3                       # PIO 3 and 4
    assert w[63] & 7 == 0 and w[88] == 0                       # no DMA modes
    assert max(i for i in range(8) if w[80] & (1 << i)) >= 4   # ata_id_major_version >= 4
    raw = to_bytes(w)
    assert raw[510] == 0xA5 and sum(raw) % 256 == 0


def test_read_sectors_lba28_two_sectors_interrupt_per_block():
    pio, drive, disk, irq, _ = make()
    lba28(pio, 0x20, 100, 2)
    assert irq.edges == 1
    pio.read(0x1F7, 1)
    first = to_bytes(words(pio))
    assert first == disk.buf[100 * 512:101 * 512]
    assert irq.edges == 2                     # the second block's DRQ interrupts again
    assert pio.read(0x1F7, 1) & DRQ
    second = to_bytes(words(pio))
    assert second == disk.buf[101 * 512:102 * 512]
    assert pio.read(0x1F7, 1) == DRDY | 0x10  # done: no DRQ, no error
    assert irq.edges == 2


def test_read_with_32bit_data_accesses():
    pio, drive, disk, irq, _ = make()
    lba28(pio, 0x20, 7, 1)
    pio.read(0x1F7, 1)
    data = b"".join(pio.read(0x1F0, 4).to_bytes(4, "little") for _ in range(128))
    assert data == disk.buf[7 * 512:8 * 512]


def test_write_sectors_ext_and_flush():
    pio, drive, disk, irq, _ = make()
    payload = bytes(range(256)) * 4
    lba48(pio, 0x34, 1000, 2)
    assert irq.edges == 0 and pio.read(0x3F6, 1) & DRQ      # first block: DRQ, no interrupt
    for i in range(0, 512, 2):
        pio.write(0x1F0, 2, int.from_bytes(payload[i:i + 2], "little"))
    assert irq.edges == 1 and pio.read(0x1F7, 1) & DRQ
    for i in range(512, 1024, 2):
        pio.write(0x1F0, 2, int.from_bytes(payload[i:i + 2], "little"))
    assert irq.edges == 2 and pio.read(0x1F7, 1) == DRDY | 0x10
    assert disk.buf[1000 * 512:1002 * 512] == payload
    pio.write(0x1F7, 1, 0xEA)
    assert disk.flushes == 1 and irq.edges == 3 and pio.read(0x1F7, 1) & ERR == 0


def test_read_write_multiple():
    pio, drive, disk, irq, _ = make()
    lba28(pio, 0xC4, 0, 4)
    assert pio.read(0x1F7, 1) & ERR and pio.read(0x1F1, 1) == ABRT   # multiple mode not set
    pio.write(0x1F2, 1, 3)
    pio.write(0x1F7, 1, 0xC6)
    assert pio.read(0x1F7, 1) & ERR                       # 3 is not a power of two
    pio.write(0x1F2, 1, 4)
    pio.write(0x1F7, 1, 0xC6)
    assert pio.read(0x1F7, 1) & ERR == 0
    lba28(pio, 0xC4, 10, 6)                               # blocks of 4 then 2 sectors
    pio.read(0x1F7, 1)
    got = to_bytes(words(pio, 4 * 256))
    assert pio.read(0x1F7, 1) & DRQ
    got += to_bytes(words(pio, 2 * 256))
    assert got == disk.buf[10 * 512:16 * 512]
    assert irq.edges == 2 + 2 + 1
    lba48(pio, 0x39, 20, 5)
    pio.write(0x1F0, 2, 0x1234)
    for _ in range(5 * 256 - 1):
        pio.write(0x1F0, 2, 0xBEEF)
    assert disk.buf[20 * 512:20 * 512 + 4] == b"\x34\x12\xef\xbe"
    assert pio.read(0x1F7, 1) == DRDY | 0x10


def test_past_the_end_is_idnf_with_the_lba_reported():
    pio, drive, disk, irq, _ = make()
    lba28(pio, 0x20, SECTORS - 1, 2)
    assert pio.read(0x1F7, 1) & (ERR | DRQ) == ERR
    assert pio.read(0x1F1, 1) == IDNF
    lba48(pio, 0x24, 1 << 40, 1)
    assert pio.read(0x1F7, 1) & ERR and pio.read(0x1F1, 1) == IDNF
    assert irq.edges == 2


def test_unknown_command_and_packet_identify_abort():
    pio, *_ = make()
    for cmd in (0xA1, 0xA0, 0x00, 0xFF, 0xC8):
        pio.write(0x1F7, 1, cmd)
        assert pio.read(0x1F7, 1) == DRDY | 0x10 | ERR
        assert pio.read(0x1F1, 1) == ABRT


def test_write_to_readonly_disk_aborts():
    pio, drive, disk, *_ = make(readonly=True)
    lba28(pio, 0x30, 0, 1)
    assert pio.read(0x1F7, 1) & (ERR | DRQ) == ERR and pio.read(0x1F1, 1) == ABRT


def test_set_features():
    pio, drive, *_ = make()
    pio.write(0x1F1, 1, 0x03)
    pio.write(0x1F2, 1, 0x0C)                 # PIO 4
    pio.write(0x1F7, 1, 0xEF)
    assert pio.read(0x1F7, 1) & ERR == 0
    pio.write(0x1F2, 1, 0x42)                 # UDMA 2: we have no DMA
    pio.write(0x1F7, 1, 0xEF)
    assert pio.read(0x1F7, 1) & ERR
    pio.write(0x1F1, 1, 0x82)
    pio.write(0x1F7, 1, 0xEF)
    assert not drive.write_cache and drive.identify()[85 * 2] & 0x20 == 0


def test_srst_posts_the_signature():
    pio, drive, disk, irq, _ = make(slave=True)
    pio.write(0x1F2, 1, 0x55)
    pio.write(0x3F6, 1, 0x06)                 # SRST | nIEN
    assert pio.read(0x3F6, 1) & BSY
    pio.write(0x3F6, 1, 0x02)
    for dev in (0, 1):
        pio.write(0x1F6, 1, 0xA0 | dev << 4)
        assert [pio.read(0x1F0 + r, 1) for r in (1, 2, 3, 4, 5)] == [0x01, 1, 1, 0, 0]
        assert pio.read(0x1F7, 1) == DRDY | 0x10
    assert irq.edges == 0


def test_absent_slave_reads_zero_and_ignores_commands():
    pio, drive, disk, irq, _ = make()
    pio.write(0x1F6, 1, 0xB0)                 # select the slave
    pio.write(0x1F2, 1, 0x55)                 # ata_devchk
    pio.write(0x1F3, 1, 0xAA)
    assert pio.read(0x1F2, 1) == 0 and pio.read(0x1F3, 1) == 0
    assert pio.read(0x1F7, 1) == 0 and pio.read(0x3F6, 1) == 0
    pio.write(0x1F7, 1, 0xEC)
    assert irq.edges == 0 and pio.read(0x1F7, 1) == 0
    pio.write(0x1F6, 1, 0xA0)                 # the master still saw the writes
    assert pio.read(0x1F2, 1) == 0x55 and pio.read(0x1F3, 1) == 0xAA
    # The empty secondary channel reads 0 too.
    assert pio.read(0x177, 1) == 0 and pio.read(0x172, 1) == 0


def test_nien_masks_intrq_and_unselected_drive_does_not_interrupt():
    pio, drive, disk, irq, _ = make(slave=True)
    pio.write(0x3F6, 1, 0x02)
    pio.write(0x1F6, 1, 0xA0)
    pio.write(0x1F7, 1, 0xE7)
    assert not irq.level
    pio.write(0x3F6, 1, 0x00)                 # unmasking shows the pending interrupt
    assert irq.level
    pio.write(0x1F6, 1, 0xB0)                 # select the slave: the master releases INTRQ
    assert not irq.level
    pio.write(0x1F6, 1, 0xA0)
    assert irq.level
    pio.read(0x3F6, 1)                        # alternate status does not acknowledge
    assert irq.level
    pio.read(0x1F7, 1)
    assert not irq.level


def test_hob_readback():
    pio, *_ = make()
    pio.write(0x1F3, 1, 0x11)
    pio.write(0x1F3, 1, 0x22)
    assert pio.read(0x1F3, 1) == 0x22
    pio.write(0x3F6, 1, 0x80)
    assert pio.read(0x1F3, 1) == 0x11


def test_pci_function_for_ata_piix():
    pio, drive, disk, irq, ide = make()
    pci = PciBus(pio=pio)
    slot = pci.add(ide)
    dev = pci.device_at(slot)
    assert dev.get32(0) == 0x70108086
    assert dev.config[0x09:0x0C] == bytes([0x80, 0x01, 0x01])
    assert dev.config[0x41] & 0x80 and dev.config[0x43] & 0x80   # piix_enable_bits
    assert dev.get32(0x20) == 0                  # BAR4 is zero: libata goes PIO-only
    dev.config_write(0x40, 2, 0xA307)            # piix_set_piomode writes timings
    assert dev.get16(0x40) == 0xA307


def test_disk_image_backend(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * 512))
    with DiskImage(path, snapshot=True) as image:
        pio_drive = AtaDrive(image)
        ch = IdeChannel(RecordingIrqLine(), pio_drive)
        pio = Bus("pio")
        ch.register_on(pio, (0x1F0, 0x3F6), "p")
        lba28(pio, 0x30, 3, 1)
        for _ in range(256):
            pio.write(0x1F0, 2, 0xA55A)
        lba28(pio, 0x20, 3, 1)
        assert words(pio, 1) == [0xA55A]
    assert path.read_bytes() == bytes(64 * 512)  # the snapshot left the image alone


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 7), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("r"), st.integers(0, 7), st.sampled_from([1, 2, 4]), st.just(0)),
    st.tuples(st.just("ctl"), st.just(0), st.just(1), st.integers(0, 255)),
    st.tuples(st.just("cmd"), st.just(7), st.just(1),
              st.sampled_from([0x20, 0x24, 0x29, 0x30, 0x34, 0x39, 0x40, 0x90, 0xC4, 0xC5, 0xC6,
                               0xE7, 0xEA, 0xEC, 0xEF, 0xA1, 0x00, 0x42, 0xE5])),
), max_size=60))
def test_fuzz_ata_registers(seq):
    pio, drive, disk, irq, _ = make()
    for op, off, size, value in seq:
        if op in ("w", "cmd"):
            pio.write(0x1F0 + off, size, value & ((1 << (8 * size)) - 1))
        elif op == "r":
            assert 0 <= pio.read(0x1F0 + off, size) < 1 << (8 * size)
        else:
            pio.write(0x3F6, 1, value)
        ch = drive
        channel_devctl = pio.find(0x3F6).device.channel.devctl
        if ch.status & BSY:
            assert channel_devctl & 0x04, "BSY only during a software reset"
        if ch.status & ERR:
            assert ch.error, "ERR with an empty error register"
            assert not ch.status & DRQ
        if ch.status & DRQ:
            assert ch.pos < len(ch.buf) and len(ch.buf) % 512 == 0
        # The drive checks every LBA range itself: the backend never sees a request it has to
        # refuse (MemoryDisk would raise, the drive would turn that into an error status, and a
        # missing bounds check would look like a proper IDNF from outside).
        assert drive.host_errors == 0, "the drive passed an out-of-range request to its disk"
        channel = pio.find(0x1F0).device
        sel = channel.drive
        assert irq.level == bool(sel is not None and sel.irq_pending
                                 and not channel.devctl & 0x02)
        if channel.selected == 1:
            assert pio.read(0x1F7, 1) == 0 and pio.read(0x1F2, 1) == 0


# ---- both channels, master and slave ----

CHANNELS = {"primary": (0x1F0, 0x3F6), "secondary": (0x170, 0x376)}


def make_four():
    """PIIX with a master and a slave on each channel, every one on its own small disk whose
    sectors carry (drive number, sector number)."""
    drives, irqs = {}, {}
    for name in CHANNELS:
        pair = []
        for unit in (0, 1):
            n = len(drives)
            data = b"".join(bytes([n]) + s.to_bytes(3, "little") + bytes(508) for s in range(64))
            pair.append(AtaDrive(MemoryDisk(len(data), data=data), serial=f"SN{n}"))
            drives[(name, unit)] = pair[-1]
        irqs[name] = RecordingIrqLine()
    ide = PiixIde(IdeChannel(irqs["primary"], *[drives[("primary", u)] for u in (0, 1)]),
                  IdeChannel(irqs["secondary"], *[drives[("secondary", u)] for u in (0, 1)]))
    pio = Bus("pio")
    ide.register_on(pio)
    return pio, drives, irqs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from(sorted(CHANNELS)),
    st.one_of(
        st.tuples(st.just("w"), st.integers(0, 7), st.sampled_from([1, 2, 4]),
                  st.integers(0, 2**32 - 1)),
        st.tuples(st.just("r"), st.integers(0, 7), st.sampled_from([1, 2, 4]), st.just(0)),
        st.tuples(st.just("ctl"), st.just(0), st.just(1), st.integers(0, 255)),
        st.tuples(st.just("dev"), st.just(6), st.just(1), st.sampled_from([0xA0, 0xB0, 0xE0, 0xF0])),
        st.tuples(st.just("cmd"), st.just(7), st.just(1),
                  st.sampled_from([0x20, 0x24, 0x30, 0x34, 0x40, 0xC4, 0xC5, 0xC6, 0xE7, 0xEA,
                                   0xEC, 0xEF, 0xA1, 0x00])))),
    max_size=60))
def test_fuzz_ide_slave_and_secondary(seq):
    """Register fuzzing on both channels with a slave: each drive answers only when selected,
    never hands its disk an out-of-range request, never shows ERR with DRQ, and a sector read
    from a drive carries that drive's own number (no cross-talk between drives)."""
    pio, drives, irqs = make_four()
    for channel_name, (op, off, size, value) in seq:
        base, ctl = CHANNELS[channel_name]
        if op in ("w", "cmd", "dev"):
            pio.write(base + off, size, value & ((1 << (8 * size)) - 1))
        elif op == "r":
            got = pio.read(base + off, size)
            assert 0 <= got < 1 << (8 * size)
        else:
            pio.write(ctl, 1, value)
        for (name, unit), d in drives.items():
            assert d.host_errors == 0, (name, unit)
            if d.status & ERR:
                assert d.error and not d.status & DRQ, (name, unit)
        sel = pio.find(base).device.drive
        if op == "cmd" and value in (0x20, 0x24, 0xC4) and sel is not None and sel.status & DRQ:
            # a read's first DRQ block comes from the selected drive's own disk
            n = sel.buf[0]
            assert n == [d for d in drives.values()].index(sel), (channel_name, n)
        channel = pio.find(base).device
        assert irqs[channel_name].level == bool(
            channel.drive is not None and channel.drive.irq_pending and not channel.devctl & 0x02)
