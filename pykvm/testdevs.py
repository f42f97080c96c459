"""The QEMU-compatible test devices, wired onto a Machine: what `pykvm boot` adds for test suites
written against QEMU (kvm-unit-tests, hobby kernels' CI).

    port 0x510-0x51b  fw_cfg, legacy I/O and DMA (always)           pykvm/devices/fw_cfg.py
    port 0x8900       Bochs shutdown ("Shutdown" powers off; always) pykvm/devices/bochs_shutdown.py
    port 0xf4 (PORT)  isa-debug-exit (--debug-exit [PORT[,SIZE]])   pykvm/devices/debug_exit.py
    0xe0.. 0x2000..   pc-testdev (--testdev)                        pykvm/devices/pc_testdev.py

With --debug-exit at 0xf4, isa-debug-exit replaces pykvm's own exit port there (pykvm.pc): the
guest then ends with QEMU's status (v << 1) | 1 rather than pykvm's "exit" stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .devices import pc_testdev as T
from .devices.bochs_shutdown import PORT as BOCHS_PORT, BochsShutdown
from .devices.debug_exit import IsaDebugExit
from .devices.fw_cfg import PORT_BASE as FW_CFG_PORT, PORT_SPAN as FW_CFG_SPAN, FwCfg, FwCfgError, check_name
from .irq import NullIrqLine
from .machine import Machine, MachineError, Stop


@dataclass
class TestDevices:
    fw_cfg: FwCfg
    bochs: BochsShutdown
    debug_exit: IsaDebugExit | None = None
    testdev: dict = field(default_factory=dict)     # name -> device, when --testdev


def parse_fw_cfg(spec: str) -> tuple[str, bytes]:
    """QEMU's `-fw_cfg [name=]NAME,file=PATH` or `[name=]NAME,string=TEXT` -> (name, contents).
    Raises MachineError with a one-line message."""
    name = path = text = None
    for i, part in enumerate(spec.split(",")):
        key, eq, value = part.partition("=")
        if not eq and i == 0:
            key, value = "name", part
        if key == "name":
            name = value
        elif key == "file":
            path = value
        elif key == "string":
            text = value
        else:
            raise MachineError(f"--fw-cfg {spec!r}: unknown key {key!r} "
                               "(expected name=opt/...,file=PATH or string=TEXT)")
    if not name or (path is None) == (text is None):
        raise MachineError(f"--fw-cfg {spec!r}: give name=opt/... and one of file=PATH, string=TEXT")
    try:
        check_name(name)
    except FwCfgError as e:
        raise MachineError(str(e)) from None
    if text is not None:
        return name, text.encode()
    from .cli_checks import MAX_INITRD, read_input     # FIFO-safe, size-limited, one-line errors
    return name, read_input(path, f"--fw-cfg {name} file", MAX_INITRD)


def add_test_devices(machine: Machine, *, debug_exit: tuple[int, int] | None = None,
                     fw_cfg_files: list[tuple[str, bytes]] = (), testdev: bool = False,
                     cpus: int | None = None) -> TestDevices:
    """Register the devices on `machine` (see the module docstring) and return them. `cpus`, for
    fw_cfg's CPU count: the machine's vCPUs unless given."""
    if cpus is None:
        cpus = len(getattr(machine, "vcpus", None) or [machine])
    fw_cfg = FwCfg(ram_size=machine.mem.size, cpus=cpus, mem=machine.mem)
    for name, data in fw_cfg_files:
        try:
            fw_cfg.add_file(name, data)
        except FwCfgError as e:
            raise MachineError(str(e)) from None
    machine.add_pio(FW_CFG_PORT, FW_CFG_SPAN, fw_cfg, "fw_cfg")
    bochs = BochsShutdown(lambda: machine.request_stop(
        Stop("poweroff", message='the guest wrote "Shutdown" to port 0x8900')))
    machine.add_pio(BOCHS_PORT, 1, bochs, "Bochs shutdown")
    devices = TestDevices(fw_cfg, bochs)

    if debug_exit is not None:
        port, size = debug_exit
        for r in machine.pio.ranges():
            if r.base < port + size and port < r.end:
                if r.name != "exit port":
                    raise MachineError(f"--debug-exit {port:#x},{size} overlaps {r.name} at "
                                       f"{r.base:#x}")
                machine.pio.unregister(r.base)    # isa-debug-exit takes over pykvm's exit port
        devices.debug_exit = IsaDebugExit(lambda status: machine.request_stop(
            Stop("debug-exit", status, f"the guest wrote {(status >> 1):#x} to isa-debug-exit; "
                 f"exit status {status}")), size)
        machine.add_pio(port, size, devices.debug_exit, "isa-debug-exit")

    if testdev:
        def line(n):
            return machine.irq_line(n) if machine.irqchip != "none" else NullIrqLine()
        scratch = T.Scratch32()
        devices.testdev = {"scratch": scratch, "flush": T.FlushPage(), "irq": T.IrqLines(line),
                           "iomem": T.IoMem()}
        machine.add_pio(T.PORT_SCRATCH, 4, scratch, "pc-testdev scratch")
        machine.add_pio(T.PORT_FLUSH, 4, devices.testdev["flush"], "pc-testdev flush")
        # QEMU's byte-decoded window is 4 ports wide, but 0xe9 is the debug console here (in QEMU
        # the two regions overlap and isa-debugcon wins): only 0xe8 itself is claimed.
        machine.add_pio(T.PORT_SCRATCH_BYTES, 1, scratch, "pc-testdev scratch (bytes)")
        machine.add_pio(T.PORT_IRQ, T.IRQ_LINES, devices.testdev["irq"], "pc-testdev irq")
        machine.add_mmio(T.IOMEM_BASE, T.IOMEM_SIZE, devices.testdev["iomem"], "pc-testdev iomem")
    return devices
