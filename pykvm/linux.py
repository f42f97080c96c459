"""`LinuxVM`: boot a Linux kernel - what `pykvm boot` does, as a library for test suites.

    from pykvm import LinuxVM

    with LinuxVM("bzImage", initrd="initramfs.cpio.gz", memory="256M") as vm:
        vm.start()
        vm.console.expect(r"Run /init as init process", timeout=120)

The stages: build a Machine (VM, RAM, in-kernel irqchip), add the PC devices (pykvm.pc), load the
kernel with the Linux boot protocol (pykvm.boot.load_linux), set up the vCPU for the 64-bit entry
(pykvm.x86.cpu), and run. On a KVM-PVM host (pykvm.pvm), the kernel arguments that host needs are
added and the instructions its emulator lacks are completed by pykvm.
"""

from __future__ import annotations

import os

from . import cli_checks, pvm
from .boot import BootError            # (pykvm.boot loads its parts on first use)
from .boot.cmdline import Cmdline
from .config import LinuxConfig
from .console import ConsoleLog
from .halt import watch_for_final_halt
from .machine import Machine, MachineError
from .stop import Stop, StopReason
from .pc import add_pc_devices
from .runnable import RunnableVM
from .x86 import cpu, layout


# What every pykvm guest gets unless the user says otherwise (Cmdline.add_default).
DEFAULT_ARGS = [
    ("console", "ttyS0"),
    ("reboot", "k"),       # reboot through the i8042, which pykvm turns into a "reset" stop
    ("panic", "-1"),       # a panic reboots at once instead of hanging (a clean stop for tests)
    ("i8042.noaux", None), # no PS/2 mouse to probe
]

PANIC_LINE = r"Kernel panic - not syncing"
# `poweroff` when the kernel can cut the power (ACPI): kernel_power_off() prints this first. With
# no power-off hardware the reboot syscall turns a power-off into a halt (kernel/reboot.c). With
# pykvm's ACPI (acpi=True) the kernel goes on to write PM1a_CNT, and that write is the stop
# (pykvm.acpi.platform): the console line is only watched without ACPI.
POWEROFF_LINE = r"reboot: Power down"
# `halt`, and `poweroff` when the kernel has no way to cut the power (no ACPI): kernel_halt() prints
# this, then every CPU executes hlt with interrupts off (pykvm.halt sees that state too).
HALT_LINE = r"reboot: System halted"


# On KVM-PVM hosts every kernel instruction is emulated, so pure busywork at boot costs seconds.
# These arguments skip some without changing what the guest can do (each measured here):
PVM_SPEED_ARGS = [
    # No read-only/NX remapping of kernel sections after init: mark_rodata_ro() frees and poisons
    # (memsets) the 2 MiB-alignment gaps between text, rodata and data, ~6 s of emulated memset.
    "rodata=off",
]
# With one vCPU: unpack the initramfs inside its initcall, not in an async worker. Linux 5.13+
# unpacks it asynchronously (init/initramfs.c, populate_rootfs) so other initcalls can go on while
# it runs; with a single emulated CPU nothing runs beside it, the worker only adds scheduling, and
# the work lands inside whichever initcall was waiting (bench/boot_insns.py). Measured on the test
# kernel, 256 MiB, two pairs of boots interleaved: 18.85/18.09 M instructions emulated with the
# async worker, 18.32/17.80 M without (-2-3 %), wall time lower in both pairs.
PVM_ONE_CPU_SPEED_ARGS = ["initramfs_async=0"]

# With irqchip="user" there is no local APIC or IOAPIC: the kernel must use the 8259s directly.
USER_IRQCHIP_ARGS = ["nolapic", "noapic"]


def parse_size(text: str | int) -> int:
    """'256M', '1G', '65536K', or a byte count (pykvm.cli_checks.size: finite numbers only)."""
    return cli_checks.size(text)


def _read_file(path: str | os.PathLike, what: str) -> bytes:
    # A regular file of bounded size only: a FIFO or /dev/zero would hang or fill memory.
    limit = cli_checks.MAX_KERNEL if what == "kernel" else cli_checks.MAX_INITRD
    return cli_checks.read_input(path, what, limit)


class LinuxVM(RunnableVM):
    """A Linux guest on a PC (one vCPU, or `cpus=N`), built from a `LinuxConfig` (pykvm/config.py):

        LinuxVM(LinuxConfig(BootConfig("bzImage"), MachineConfig(memory="1G")))
        LinuxVM("bzImage", memory="1G", disk="root.img")      # the same, as flat keywords

    The keywords are the configuration's field names (each group's docstring says what they mean);
    given with a config, they replace its fields. The result is `self.config`."""

    def __init__(self, kernel: str | os.PathLike | LinuxConfig, *, _restore=None, **options):
        if isinstance(kernel, LinuxConfig):
            config = kernel.replace(**options) if options else kernel
        else:
            config = LinuxConfig.from_options(kernel, **options)
        self.config = config
        boot, hw, dev = config.boot, config.machine, config.devices
        pvm_workarounds, irqchip, console = hw.pvm_workarounds, hw.irqchip, dev.console
        self.memory = hw.memory
        if _restore is None:        # a restored VM's kernel is already in its RAM (pykvm/snapshot/)
            kernel_bytes = _read_file(boot.kernel, "kernel")
            initrd_bytes = _read_file(boot.initrd, "initrd") if boot.initrd else None

        self.host_kind = pvm.host_kind()
        if pvm_workarounds is None:
            pvm_workarounds = self.host_kind == "KVM-PVM"
        self.pvm_workarounds = pvm_workarounds

        self.cmdline = Cmdline(boot.append)
        if console == "hvc0":
            self.cmdline.add_default("console", "hvc0")
        if irqchip == "user":
            for arg in USER_IRQCHIP_ARGS:
                self.cmdline.add_default(arg)
        for key, value in DEFAULT_ARGS:
            if key == "reboot" and hw.acpi:
                continue        # Linux's default: the FADT's reset register first, then the i8042
            self.cmdline.add_default(key, value)
        if not hw.acpi:
            # No tables to find: spare an ACPI kernel the search (and its "valid RSDP was not
            # found" error); it takes the CPUs and interrupt routes from the MP table.
            self.cmdline.add_default("acpi", "off")
        self.added_pvm_args: list[str] = []
        self.skipped_busywork: list[str] = []
        if pvm_workarounds:
            try:
                speed = PVM_SPEED_ARGS + (PVM_ONE_CPU_SPEED_ARGS if hw.cpus == 1 else [])
                self.added_pvm_args = pvm.add_pvm_args(self.cmdline, speed)
            except ValueError as e:     # a clearcpuid= of the user's that no longer fits
                raise BootError(str(e)) from None
            if hw.pvm_skip_busywork:
                self.skipped_busywork = pvm.add_busywork_args(self.cmdline)

        self.console = ConsoleLog()
        self.attached: list = []        # VirtioAttachment of each virtio device, in attach order
        self.disk = None
        self.acpi = None                # pykvm.acpi.platform.AcpiPlatform when acpi=True
        self.machine = Machine(self.memory, irqchip=irqchip, fast_path=hw.fast_path, cpus=hw.cpus,
                               ram=_restore.ram_backend if _restore is not None else None)
        try:
            self.devices = add_pc_devices(self.machine, self.console)
            self.pci = self._add_pci()
            if dev.disk is not None:
                self.disk = self._open_disk(dev.disk, dev.readonly, dev.snapshot)
            if dev.disk_bus == "ide":
                self._add_ide()
            elif dev.disk_bus == "virtio-pci" and self.disk is not None:
                from .virtio import VirtioBlk
                from .virtio.attach import attach_pci
                # On the PCI bus: the kernel finds it by scanning, no command line argument.
                self.attached.append(attach_pci(self.machine, self.pci,
                                                VirtioBlk(self.disk, readonly=dev.readonly)))
                self.cmdline.add_default("root", "/dev/vda")
            self._add_virtio(self.disk if dev.disk_bus == "virtio-mmio" else None, dev.readonly,
                             dev.rng, dev.net_tap, console, dev.ioeventfd)
            self._add_clock_args()
            if hw.acpi:
                from .acpi.platform import install_acpi
                # The PM registers always; the tables only on a fresh boot (a restored guest's RAM
                # already holds them).
                self.acpi = install_acpi(self.machine, cpus=hw.cpus, pci_irqs=self._pci_routes(),
                                         write_tables=_restore is None)
            if _restore is not None:
                from .snapshot.linux import apply_to
                self.plan = None
                apply_to(self, _restore)
            else:
                if irqchip == "kernel":
                    self._write_mptable()
                from .boot.loader import load_linux, stage_kernel
                staged = stage_kernel(kernel_bytes, decompress=boot.decompress)
                # The command line is settled here, once, and written to the guest as it stands.
                self._forget(staged.unknown_params(self._own_pvm_keys()))
                self._check_line_fits(staged.cmdline_max)
                self.plan = load_linux(self.machine.mem, staged, str(self.cmdline),
                                       initrd=initrd_bytes,
                                       acpi_rsdp=self.acpi.tables.rsdp if self.acpi else 0)
                self._setup_vcpu()
        except BaseException:
            self.close()
            raise
        if pvm_workarounds:
            self.machine.internal_error_handlers.append(pvm.complete_gap_lazily)
            # A vmcall never exits on KVM-PVM: look at the vCPU once a second, and complete a
            # vmcall it is stuck on (pykvm.pvm.StuckVmcall).
            self.machine.interrupted_handlers.append(pvm.LazyStuckVmcall().check)
            self.machine.watchdog_period = 1.0
        # The final hlt stays inside KVM with the in-kernel irqchip: look at the vCPU on a kick.
        watch_for_final_halt(self.machine)
        self.console.on_line(PANIC_LINE, lambda m: self.machine.request_stop(
            Stop(StopReason.PANIC, message="the kernel panicked")))
        if not hw.acpi:
            self.console.on_line(POWEROFF_LINE, lambda m: self.machine.request_stop(
                Stop(StopReason.POWEROFF, message="the guest powered off")))
        self.console.on_line(HALT_LINE, lambda m: self.machine.request_stop(
            Stop(StopReason.HALT, message="the guest halted the system")))
        until = config.until
        if until:
            self.console.on_line(until, lambda m: self.machine.request_stop(
                Stop(StopReason.UNTIL, message=f"console matched {until!r}")))
        self.machine.on_stop.append(lambda stop: self.console.close())

    def _own_pvm_keys(self) -> list[str]:
        """Keys of the KVM-PVM arguments pykvm added (never the user's, never a merged clearcpuid)."""
        users = Cmdline(self.config.boot.append)
        return [key for key in (a.partition("=")[0] for a in self.added_pvm_args + self.skipped_busywork)
                if key != "clearcpuid" and not users.has(key)]

    def _forget(self, keys) -> None:
        """Take pykvm's own arguments with these keys off the command line (and off the lists that
        report them): the kernel does not know them (pykvm.boot.params says why that matters)."""
        for key in keys:
            self.cmdline.remove(key)
        gone = set(keys)
        self.added_pvm_args = [a for a in self.added_pvm_args if a.partition("=")[0] not in gone]
        self.skipped_busywork = [a for a in self.skipped_busywork
                                 if a.partition("=")[0] not in gone]

    def _check_line_fits(self, max_len: int) -> None:
        """A line longer than the kernel's setup_header.cmdline_size is refused by the loader; say
        here how much of it is the user's --append, which is the part they can shorten."""
        total = len(str(self.cmdline).encode())
        if total <= max_len:
            return
        own = total - len(str(Cmdline(self.config.boot.append)).encode())
        fix = (f"--append is {total - own} bytes; beside pykvm's own {own} it can have at most "
               f"{max_len - own}" if own < max_len else
               f"pykvm's own arguments alone are {own} bytes (--no-pvm-workarounds leaves "
               "most off)")
        raise BootError(f"command line is {total} bytes but this kernel accepts at most {max_len} "
                        f"(setup_header.cmdline_size): {fix}")

    def _open_disk(self, disk, readonly: bool, snapshot: bool):
        from .host.disk import DiskImage
        path = cli_checks.disk_image(disk, writable=not (readonly or snapshot))
        return DiskImage(path, readonly=readonly, snapshot=snapshot)

    def _add_pci(self):
        """A PCI host bridge on configuration mechanism #1 (0xcf8/0xcfc): Linux finds the bus there,
        and the IDE controller (and virtio-pci devices) live on it."""
        from .devices.pci import PciBus
        pci = PciBus(mmio=self.machine.mmio, pio=self.machine.pio, on_reset=lambda: self.machine.request_stop(
            Stop(StopReason.RESET, message="the guest reset the machine (port 0xcf9)")))
        pci.register_on(self.machine.pio)
        return pci

    def _add_ide(self) -> None:
        """The PIIX IDE function: the disk as primary master (/dev/sda), IRQ 14/15 at the legacy ports."""
        from .devices.ide import AtaDrive, IdeChannel, PiixIde
        primary = IdeChannel(self.machine.irq_line(layout.IRQ_ATA0),
                             AtaDrive(self.disk) if self.disk is not None else None)
        self.ide = PiixIde(primary, IdeChannel(self.machine.irq_line(layout.IRQ_ATA1)),
                           memory=self.machine.mem)       # bus-master DMA (ide/bmdma.py)
        self.ide.register_on(self.machine.pio)
        self.pci.add(self.ide)
        if self.disk is not None:
            self.cmdline.add_default("root", "/dev/sda")

    def _pci_routes(self) -> list[tuple[int, int, int]]:
        """(slot, pin, irq) for each PCI INTx in use (the IDE function is on its legacy IRQs)."""
        from .devices.pci.device import INTERRUPT_LINE, INTERRUPT_PIN
        routes = []
        for slot, function, device in self.pci.functions():
            pin = device.config[INTERRUPT_PIN]
            if pin and function == 0 and device is not getattr(self, "ide", None):
                routes.append((slot, pin, device.config[INTERRUPT_LINE]))
        return routes

    def _write_mptable(self) -> None:
        """Describe the CPU, the IOAPIC and the interrupt routes (ISA and PCI INTx) in an MP table
        (pykvm/x86/mptable.py), as the in-kernel irqchip provides them. Written with ACPI too: an
        ACPI kernel prefers the MADT, and one booted with acpi=off still finds its CPUs."""
        from .x86 import mptable
        gpa, blob = mptable.build(cpus=len(self.machine.vcpus), pci_irqs=self._pci_routes())
        self.machine.mem.write(gpa, blob)

    def _add_clock_args(self) -> None:
        """Tell the kernel its TSC frequency. Linux measures it against the PIT otherwise, in a
        10 ms busy loop that needs a thousand PIT reads; at emulated speed (KVM-PVM) or with the
        PIT in Python that loop fails, the TSC is marked unstable and timekeeping falls back to
        jiffies. KVM knows the vCPU's TSC frequency exactly (KVM_GET_TSC_KHZ)."""
        try:
            khz = self.machine.vcpu.tsc_khz()
        except OSError:
            return
        if khz:
            self.cmdline.add_default("tsc_early_khz", khz)

    def _add_virtio(self, disk, readonly, rng, net_tap, console, ioeventfd) -> None:
        from .virtio import attach_mmio, VirtioBlk, VirtioConsole, VirtioNet, VirtioRng
        devices = []
        if disk is not None:
            devices.append(VirtioBlk(disk, readonly=readonly))
            self.cmdline.add_default("root", "/dev/vda")
        if console == "hvc0":
            self.hvc = VirtioConsole(self.console.write)
            devices.append(self.hvc)
        if rng:
            devices.append(VirtioRng())
        if net_tap is not None:
            from .host.tap import Tap
            devices.append(VirtioNet(Tap(net_tap)))
        for index, device in enumerate(devices):
            attached = attach_mmio(self.machine, device, index, ioeventfd=ioeventfd)
            self.cmdline.add(*attached.kernel_arg.split("=", 1))
            self.attached.append(attached)

    @property
    def virtio(self) -> list:
        """The virtio devices, in attach order."""
        return [a.device for a in self.attached]

    def _setup_vcpu(self) -> None:
        """Every vCPU gets its CPUID (with its APIC id) and MSRs; only vCPU 0, the bootstrap
        processor, is put at the kernel's 64-bit entry. The others stay as KVM made them, waiting
        for the kernel's INIT/SIPI (KVM_MP_STATE_UNINITIALIZED; pykvm.machine)."""
        for vcpu in self.machine.vcpus:
            cpu.setup_cpuid(self.machine.kvm, vcpu)
            cpu.setup_msrs(vcpu)
        cpu.setup_long_mode(self.machine.vcpus[0], self.machine.mem, entry=self.plan.entry_rip,
                            cr3=self.plan.cr3, rsi=self.plan.zero_page_gpa, rsp=self.plan.stack)

    # ---- snapshots (pykvm/snapshot/) ----
    def save(self, path: str | os.PathLike) -> int:
        """Save this stopped VM to `path` (RAM, vCPU, irqchip, every device, the disk overlay);
        returns the file size. Restore it with LinuxVM.restore(path), in any process."""
        from .snapshot.linux import save_linux
        return save_linux(self, path)

    @classmethod
    def restore(cls, path: str | os.PathLike, *, until: str | None = None, clone: bool = False,
                verify: bool = False, **overrides) -> "LinuxVM":
        """A VM restored from a snapshot, ready to run() or start() from where it was saved.
        `clone`: give it its own MAC and fresh entropy (pykvm/snapshot/linux.py); `verify`:
        check RAM's checksum (reads the whole file). SnapshotError for a bad or foreign file."""
        from .snapshot.linux import restore_linux
        return restore_linux(cls, path, until=until, clone=clone, verify=verify, **overrides)

    # ---- running (run, start, wait, stop: pykvm/runnable.py) ----
    def _before_run(self) -> None:
        for attached in self.attached:
            attached.start()

    def send(self, data: bytes | str) -> None:
        """Type into the guest's console (COM1, or the virtio console with console="hvc0")."""
        data = data.encode() if isinstance(data, str) else data
        if getattr(self, "hvc", None) is not None:
            self.hvc.feed(data)
        else:
            self.devices.feed_serial(data)

    def _needs_userland(self, what: str) -> None:
        # On KVM-PVM a guest's first syscall from CPL3 faults (docs/kvm-pvm.md): no shell ever
        # answers, and waiting for one would only end in a timeout that names no reason.
        if self.host_kind == pvm.KVM_PVM:
            raise MachineError(f"{what} needs guest userland, which cannot run on this KVM-PVM "
                               "host: mark the test amdv to run it in the AMD-V lane (README), "
                               "or use a VT-x/AMD-V host")

    def shell(self, command: str, timeout: float = 120.0, check: bool = False):
        """Run a command line in the guest's shell on its console (COM1 or hvc0) and return a
        CommandResult(output, status); check=True raises CommandFailed on a non-zero status. The
        VM must be start()ed; the first call waits for a shell to answer (pykvm/testing/shell.py
        has the protocol and its limits). On a KVM-PVM host: MachineError at once, as poweroff()."""
        self._needs_userland("shell()")
        if not self.machine.running:
            raise MachineError("shell() needs a running guest: start() it first")
        if getattr(self, "_shell", None) is None:
            from .testing.shell import GuestShell
            self._shell = GuestShell(self.send, self.console)
        return self._shell.run(command, timeout=timeout, check=check)

    def poweroff(self, timeout: float = 120.0, command: str = "poweroff -f") -> Stop:
        """Type `command` into the guest's shell and wait for the machine to stop; the Stop (reason
        "poweroff", or "halt" where the kernel has no way to cut the power). TimeoutError if it
        does not stop within `timeout` seconds; on a KVM-PVM host, MachineError at once."""
        self._needs_userland("poweroff()")
        if self.machine.running:
            self.send(command + "\n")
        stop = self.wait(timeout)
        if stop is None:
            raise TimeoutError(f"the guest did not stop within {timeout:g} s of {command!r}; "
                               f"console ended with:\n{self.console.tail()}")
        return stop

    def close(self) -> None:
        """Stop the guest and release everything. Disk writes are flushed to the image first."""
        machine = getattr(self, "machine", None)
        if machine is not None and machine.running:
            machine.stop()
        for attached in getattr(self, "attached", []):
            attached.close()
        if self.disk is not None:
            self.disk.flush()
            self.disk.close()
        if machine is not None:
            machine.close()
        self.console.close()


__all__ = ["LinuxVM", "BootError", "MachineError", "parse_size"]
