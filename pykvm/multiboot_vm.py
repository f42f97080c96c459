"""`MultibootVM`: boot a Multiboot (v1) kernel - what `pykvm boot kernel.elf` does when the file
carries a multiboot header (pykvm/boot/multiboot.py), as QEMU's `-kernel` does.

    from pykvm.multiboot_vm import MultibootVM
    from pykvm.testdevs import add_test_devices

    with MultibootVM("kernel.elf", append="verbose", modules=[("mod.bin", "arg")]) as vm:
        add_test_devices(vm.machine, debug_exit=(0xf4, 4))
        stop = vm.run(timeout=30)          # Stop("debug-exit", status=(v << 1) | 1)

The stages: a Machine with the in-kernel irqchip (test suites program the local APIC and IOAPIC),
the PC devices (COM1 and the debug console both go to `console`), the kernel, its modules and the
information block in RAM, and the vCPU in 32-bit protected mode with paging off, EAX = 0x2BADB002
and EBX = the information block (pykvm.x86.cpu.setup_protected_mode). On a KVM-PVM host all of a
multiboot kernel runs at CPL0, in KVM's instruction emulator: keep such kernels small; pykvm
completes the instructions that emulator lacks, as for Linux (pykvm.pvm).
"""

from __future__ import annotations

import os

from . import cli_checks, pvm
from .boot.multiboot import Module, load_multiboot
from .config import MachineConfig
from .console import ConsoleLog
from .machine import Machine
from .pc import add_pc_devices
from .runnable import RunnableVM
from .stop import Stop, StopReason
from .x86 import cpu

DEFAULT_MEMORY = 128 << 20


def _read(path, what: str) -> bytes:
    from .cli_checks import MAX_INITRD, read_input
    return read_input(path, what, MAX_INITRD)


class MultibootVM(RunnableVM):
    """A multiboot kernel on a PC.

    kernel: the file (its path, as given, starts the kernel's command line). append: the rest of
    the command line. initrd: a first module; modules: more, as (path, args) pairs or paths.
    machine: the same MachineConfig LinuxVM takes (pykvm/config.py: memory, irqchip, fast_path,
    pvm_workarounds, cpus), or its fields as keywords (`memory=64 << 20`); memory defaults to
    128 MiB here. Extra vCPUs wait for the kernel's INIT/SIPI. `acpi` does not apply: pykvm writes
    no firmware tables for a multiboot kernel (it finds the vCPU count in fw_cfg).
    until: stop (reason "until") when a console line matches this regex."""

    def __init__(self, kernel: str | os.PathLike, *, append: str = "",
                 initrd: str | os.PathLike | None = None,
                 modules: list[tuple[str, str] | str] = (), machine: MachineConfig | None = None,
                 until: str | None = None, **machine_options):
        cli_checks.regex(until, "until")     # now: it is compiled after the machine is built
        if machine is None:
            machine = MachineConfig(**{"memory": DEFAULT_MEMORY, **machine_options})
        elif machine_options:
            raise TypeError("give machine=MachineConfig(...) or its fields as keywords, not both")
        self.config = machine
        image = _read(kernel, "kernel")
        mods = []
        for spec in ([initrd] if initrd else []) + list(modules):
            path, args = (spec, "") if isinstance(spec, (str, os.PathLike)) else spec
            text = f"{path} {args}".strip() if args else str(path)
            mods.append(Module(_read(path, "module"), text))
        self.host_kind = pvm.host_kind()
        pvm_workarounds = machine.pvm_workarounds
        if pvm_workarounds is None:
            pvm_workarounds = self.host_kind == "KVM-PVM"
        self.pvm_workarounds = pvm_workarounds
        self.added_pvm_args: list[str] = []
        self.console = ConsoleLog()
        # Extra vCPUs wait for INIT/SIPI from the kernel (the in-kernel local APIC handles them);
        # a kernel finds how many there are in fw_cfg (FW_CFG_NB_CPUS), as kvm-unit-tests do.
        self.machine = Machine(machine.memory, irqchip=machine.irqchip,
                               fast_path=machine.fast_path, cpus=machine.cpus)
        try:
            self.devices = add_pc_devices(self.machine, self.console)
            self.plan = load_multiboot(self.machine.mem, image, name=str(kernel), append=append,
                                       modules=mods)
            vcpu = self.machine.vcpu
            cpu.setup_cpuid(self.machine.kvm, vcpu)
            cpu.setup_msrs(vcpu)
            from .boot.multiboot import BOOTLOADER_MAGIC
            cpu.setup_protected_mode(vcpu, self.machine.mem, entry=self.plan.entry,
                                     eax=BOOTLOADER_MAGIC, ebx=self.plan.info_gpa)
        except BaseException:
            self.close()
            raise
        self.cmdline = self.plan.cmdline
        if pvm_workarounds:
            self.machine.internal_error_handlers.append(pvm.complete_gap)
        if until:
            self.console.on_line(until, lambda m: self.machine.request_stop(
                Stop(StopReason.UNTIL, message=f"console matched {until!r}")))
        self.machine.on_stop.append(lambda stop: self.console.close())

    def send(self, data: bytes | str) -> None:
        self.devices.feed_serial(data.encode() if isinstance(data, str) else data)

    def close(self) -> None:
        machine = getattr(self, "machine", None)
        if machine is not None:
            machine.close()
        self.console.close()


def looks_multiboot(path: str | os.PathLike) -> bool:
    """Does this kernel file carry a multiboot header? (Reads only its first 8 KiB.)"""
    from .boot.multiboot import SEARCH_LIMIT, is_multiboot
    try:
        with open(path, "rb") as f:
            return is_multiboot(f.read(SEARCH_LIMIT))
    except OSError:
        return False
