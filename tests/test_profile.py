"""The guest profiler: RIP samples from kicked exits, named through a System.map."""


from pykvm.machine import Machine
from pykvm.profile import GuestProfiler, load_system_map

from conftest import load_real_mode, needs_kvm


def test_system_map_lookup(tmp_path):
    m = tmp_path / "System.map"
    m.write_text("ffffffff81000000 T _text\nffffffff81000100 t spin\nffffffff81000200 D data\n"
                 "ffffffff81000300 T later\n")
    addrs, names = load_system_map(m)
    assert names == ["_text", "spin", "later"]          # data symbols are left out
    p = GuestProfiler(m)
    assert p.symbol(0xffffffff81000104) == "spin+0x4"
    assert p.symbol(0x1000) == "0x1000"


def test_a_stub_system_map_is_named_in_the_report(tmp_path):
    m = tmp_path / "System.map"
    m.write_text("ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")
    p = GuestProfiler(m)
    p.samples[0xffffffff81000104] += 1
    report = p.report()
    assert "names no kernel text symbols" in report and "kallsyms-finder" in report
    assert "0xffffffff81000104" in report
    assert GuestProfiler().note == ""


@needs_kvm
def test_samples_land_on_the_spinning_instruction():
    with Machine(1 << 20, irqchip="none") as m:
        load_real_mode(m, bytes([0x90, 0xeb, 0xfd]))      # l: nop; jmp l  (never exits)
        prof = GuestProfiler(period=0.01)
        prof.start(m)
        m.run(timeout=0.5)
        prof.stop()
    assert sum(prof.samples.values()) >= 5
    assert set(prof.samples) <= {0x0, 0x1}       # IP within the loop (CS base 0x1000 not in RIP)
    assert "samples every 10 ms" in prof.report()


@needs_kvm
def test_the_interrupt_flag_share_is_reported():
    """Samples with RFLAGS.IF clear (interrupt handlers, irqs-off code) are counted per vCPU."""
    shares = {}
    for first, name in ((0xfa, "cli"), (0xfb, "sti")):
        with Machine(1 << 20, irqchip="none") as m:
            load_real_mode(m, bytes([first, 0xeb, 0xfe]))      # cli or sti; l: jmp l
            prof = GuestProfiler(period=0.01)
            prof.start(m)
            m.run(timeout=0.5)
            prof.stop()
        assert sum(prof.samples.values()) >= 5
        shares[name] = prof.report()
    assert "interrupts off (RFLAGS.IF=0) in cpu0 100% of samples" in shares["cli"]
    assert "interrupts off (RFLAGS.IF=0) in cpu0 0% of samples" in shares["sti"]
