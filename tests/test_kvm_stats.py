"""KVM's own counters through KVM_GET_STATS_FD (pykvm/kvm/stats.py)."""

import os
import struct

from pykvm.kvm._lib import lib
from pykvm.kvm.stats import SHOWN, KvmStats, summed
from pykvm.machine import Machine

from conftest import Recorder, load_real_mode, needs_kvm

NAME_SIZE = 48


def stats_file(tmp_path, counters):
    """A file laid out as KVM lays out its statistics: header, descriptors (each followed by
    NAME_SIZE bytes of name), then the u64 data; `counters` is [(name, flags, values)]."""
    desc_offset = 24 + 16                   # a header, then an id string KVM would put here
    step = 16 + NAME_SIZE
    data_offset = desc_offset + step * len(counters)
    descs, data = b"", b""
    for name, flags, values in counters:
        descs += struct.pack("<IhHII", flags, 0, len(values), len(data), 0)
        descs += name.encode().ljust(NAME_SIZE, b"\0")
        data += struct.pack(f"<{len(values)}Q", *values)
    header = struct.pack("<6I", 0, NAME_SIZE, len(counters), 24, desc_offset, data_offset)
    path = tmp_path / "stats"
    path.write_bytes(header + b"kvm-1234/vcpu-0".ljust(16, b"\0") + descs + data)
    return path


def test_single_values_are_read_at_their_offsets_and_histograms_left_out(tmp_path):
    path = stats_file(tmp_path, [
        ("exits", lib.KVM_STATS_TYPE_CUMULATIVE, [1234]),
        ("halt_wait_hist", lib.KVM_STATS_TYPE_LOG_HIST, [1, 2, 3, 4]),
        ("insn_emulation", lib.KVM_STATS_TYPE_CUMULATIVE, [5 << 40]),
        ("guest_mode", lib.KVM_STATS_TYPE_INSTANT, [1]),
        ("max_mmu_rmap_size", lib.KVM_STATS_TYPE_PEAK, [17]),
        ("one_bucket_hist", lib.KVM_STATS_TYPE_LOG_HIST, [9]),     # size 1, still a histogram
    ])
    stats = KvmStats(os.open(path, os.O_RDONLY))
    try:
        assert stats.read() == {"exits": 1234, "insn_emulation": 5 << 40, "guest_mode": 1,
                                "max_mmu_rmap_size": 17}
        assert stats.types == {"exits": "cumulative", "insn_emulation": "cumulative",
                               "guest_mode": "instant", "max_mmu_rmap_size": "peak"}
    finally:
        stats.close()
    assert summed([{"exits": 2, "guest_mode": 1}, {"exits": 3}]) == {"exits": 5}


OUT_10_HLT = bytes.fromhex("b9 0a 00 b0 41 e6 e9 e2 fc f4")   # mov cx,10; mov al,'A'; out 0xe9,al; loop; hlt


@needs_kvm
def test_kvm_counts_at_least_the_exits_pykvm_saw():
    with Machine(1 << 20, irqchip="none") as m:
        rec = Recorder()
        m.add_pio(0xe9, 1, rec)
        load_real_mode(m, OUT_10_HLT)
        before = m.vcpu.kvm_stats()
        assert "exits" in before, "KVM_GET_STATS_FD: Linux 5.14 or later"
        stop = m.run(timeout=30)
        assert stop.reason == "halt" and rec.data == b"A" * 10
        after = m.vcpu.kvm_stats()
        # summed() adds these up over vCPUs: right only for counters that only grow.
        types = m.vcpu._stats.types
        assert {name: types[name] for name in SHOWN if name in types} == \
            {name: "cumulative" for name in SHOWN if name in types}
    seen = sum(m.vcpu.exit_counts().values())        # 10 port writes and the hlt
    assert seen == 11
    assert after["exits"] - before["exits"] >= seen
    assert m.vcpu.kvm_stats() == {}                   # closed: nothing to read, no error


@needs_kvm
def test_first_callers_on_two_threads_open_one_statistics_file(monkeypatch):
    """`vm.stats` may come from a test's thread while another asks too: the file is opened once
    (a second open would leak a file descriptor), and a close() during a read waits for it."""
    import threading
    import time
    from pykvm.kvm import stats
    opened = []
    real_open = stats.open_stats

    def slow_open(fd):
        time.sleep(0.05)                 # widen the window between "not open yet" and "opened"
        opened.append(fd)
        return real_open(fd)

    monkeypatch.setattr(stats, "open_stats", slow_open)
    with Machine(1 << 20, irqchip="none") as m:
        readings = []
        threads = [threading.Thread(target=lambda: readings.append(m.vcpu.kvm_stats()))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(opened) == 1
    assert len(readings) == 4 and all("exits" in r for r in readings)
