"""The C run loop (csrc/fastpath.h) against the Python models it shares state with."""

import pytest

from pykvm.console import ConsoleLog
from pykvm.machine import Machine
from pykvm.pc import add_pc_devices

from conftest import load_real_mode, needs_kvm

# Real mode at 0x1000: print "hi\n" on COM1 the way Linux's console does (poll LSR for THRE, write
# THR), write POST codes 0..N-1 to port 0x80, then signal the exit port with status 7.
def polled_uart_program(post_writes: int) -> bytes:
    code = bytearray()
    for ch in b"hi\n":
        code += bytes([0xba, 0xfd, 0x03,         # mov dx, 0x3fd (LSR)
                       0xec,                     # wait: in al, dx
                       0xa8, 0x20,               # test al, 0x20 (THRE)
                       0x74, 0xfb,               # jz wait
                       0xba, 0xf8, 0x03,         # mov dx, 0x3f8 (THR)
                       0xb0, ch,                 # mov al, ch
                       0xee])                    # out dx, al
    code += bytes([0xb9, *post_writes.to_bytes(2, "little"),   # mov cx, N
                   0x88, 0xc8,                   # l: mov al, cl
                   0xe6, 0x80,                   # out 0x80, al
                   0xe2, 0xfa,                   # loop l
                   0xb0, 0x07, 0xe6, 0xf4,       # mov al, 7; out 0xf4, al
                   0xf4])                        # hlt
    return bytes(code)


def run_program(fast: bool, post_writes: int = 1000):
    console = ConsoleLog()
    with Machine(1 << 20, fast_path=fast) as m:
        devs = add_pc_devices(m, console)
        load_real_mode(m, polled_uart_program(post_writes))
        stop = m.run(timeout=60)
        return stop, console.data, devs, m.vcpu.exit_counts(), (m.fast.handled if m.fast else 0)


@needs_kvm
@pytest.mark.parametrize("fast", [False, True])
def test_same_guest_visible_behaviour_with_and_without_c(fast):
    stop, out, devs, exits, handled = run_program(fast)
    assert (stop.reason, stop.status) == ("exit", 7)
    assert out == b"hi\n"
    assert devs.serial.bytes_out == 3
    assert devs.post.writes == 1000 and devs.post.code == 1   # the last value written: cl = 1
    if fast:
        # Every UART and POST access was answered in C: 3 LSR polls + 3 THR writes + 1000 POST.
        assert handled == 1006
        # Python only saw the exit-port write (the flush after "\n" is not an exit).
    else:
        assert handled == 0
    assert exits["IO"] == 1007


@needs_kvm
def test_uart_with_interrupts_on_goes_to_python():
    """With IER != 0 a THR write has interrupt side effects: C must leave it to the model."""
    console = ConsoleLog()
    with Machine(1 << 20, fast_path=True) as m:
        devs = add_pc_devices(m, console)
        code = bytes([0xba, 0xf9, 0x03, 0xb0, 0x02, 0xee,      # IER = THRI
                      0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee,      # THR = 'A'
                      0xb0, 0x00, 0xe6, 0xf4, 0xf4])           # exit 0
        load_real_mode(m, code)
        stop = m.run(timeout=30)
        assert stop.reason == "exit"
        assert console.data == b"A"
        assert m.fast.handled == 0
        assert devs.serial.ier == 0x02 and m.fast.regs.uart.ier == 0x02   # one copy of IER
