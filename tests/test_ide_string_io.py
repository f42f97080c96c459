"""String I/O on the ATA data register: a `rep insw`/`rep outsw` moved in one call (Bus.read_into ->
IdeChannel.read_string) must leave the same bytes, task-file state and interrupt line as the same
transfer word by word (the bus's loop, which is what a device without read_string gets)."""

from hypothesis import given, settings, strategies as st

from pykvm.bus import Bus
from pykvm.devices.ide.ata import DRQ

from test_ide import PATTERN, lba28, make

READ_SECTORS, WRITE_SECTORS, READ_MULTIPLE, WRITE_MULTIPLE, SET_MULTIPLE = 0x20, 0x30, 0xC4, 0xC5, 0xC6


class WordByWord:
    """The channel with its string methods hidden: the bus loops over single accesses."""

    def __init__(self, channel):
        self.channel = channel

    def read(self, offset, size):
        return self.channel.read(offset, size)

    def write(self, offset, size, value):
        self.channel.write(offset, size, value)


def machine(string_io: bool):
    pio, drive, disk, irq, ide = make()
    if not string_io:
        pio = Bus("pio")
        pio.register(0x1F0, 8, WordByWord(ide.primary))
        pio.register(0x3F6, 1, ide.primary.control)
    return pio, drive, disk, irq


def state(pio, drive, irq):
    return drive.status, drive.error, drive.pos, drive._xfer, irq.level, pio.read(0x3F6, 1)


@settings(max_examples=40, deadline=None)
@given(write=st.booleans(), multiple=st.sampled_from([0, 2, 8, 16]),
       lba=st.integers(0, 1000), count=st.integers(1, 40),
       chunk=st.sampled_from([1, 2, 64, 256, 300, 1024]), seed=st.integers(0, 255))
def test_string_io_equals_word_by_word(write, multiple, lba, count, chunk, seed):
    """`chunk` words per string instruction: 256 is libata's sector; others cross DRQ blocks or
    stop short of them, and must fall back to the loop with the same result."""
    results = []
    for string_io in (True, False):
        pio, drive, disk, irq = machine(string_io)
        if multiple:
            pio.write(0x1F2, 1, multiple)
            pio.write(0x1F7, 1, SET_MULTIPLE)
            pio.read(0x1F7, 1)
            cmd = WRITE_MULTIPLE if write else READ_MULTIPLE
        else:
            cmd = WRITE_SECTORS if write else READ_SECTORS
        lba28(pio, cmd, lba, count)
        got = bytearray()
        steps = []
        payload = bytes((seed + i) & 0xFF for i in range(count * 512))
        sent = 0
        while pio.read(0x3F6, 1) & DRQ and len(steps) < 1000:
            n = chunk * 2
            if write:
                data = payload[sent:sent + n].ljust(n, b"\0")
                sent += n
                pio.write_from(0x1F0, 2, memoryview(data), chunk)
            else:
                buf = bytearray(n)
                pio.read_into(0x1F0, 2, memoryview(buf), chunk)
                got += buf
            steps.append(state(pio, drive, irq))
            pio.read(0x1F7, 1)                 # acknowledge, as libata's interrupt handler does
        results.append((bytes(got), steps, irq.history, bytes(disk.buf)))
    assert results[0] == results[1]
    if not write and chunk == 256:
        assert results[0][0][:count * 512] == PATTERN[lba * 512:(lba + count) * 512]
