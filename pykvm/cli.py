"""The `pykvm` command.

    pykvm info                         what this host's KVM offers
    pykvm boot KERNEL [DISK] [...]     boot a Linux kernel with its console on the terminal
    pykvm selftest [-- COMMAND ...]    pykvm (or COMMAND) on a real AMD-V /dev/kvm, in the AMD-V lane:
                                       QEMU TCG with SVM (exit statuses: pykvm/lane/selftest.py)
    pykvm restore SNAPSHOT [...]       run a saved VM on (pykvm/snapshot/cli.py)

Each command checks its arguments first (pykvm/cli_checks.py), builds the VM from config values
(pykvm/config.py: the same MachineConfig for a Linux and a multiboot kernel), and runs it with
the block boot and restore share (pykvm/cli_run.py: console, Ctrl-A x, SIGUSR1 saves, SIGTERM).

Exit status of `pykvm boot` (also in the README):
    0    the guest powered off, halted, rebooted, or --until matched
    1    VMM error: KVM failed, or the guest hit something pykvm cannot handle
    2    bad input: usage, a missing or malformed file, too little memory, no usable /dev/kvm
    3    kernel panic
    4    timeout (--timeout passed without any of the above)
    130  interrupted (Ctrl-C, Ctrl-A x, SIGTERM); disks are flushed and closed first
    (v << 1) | 1  with --debug-exit: the guest wrote v to isa-debug-exit, as QEMU exits (the shell
         sees it modulo 256; v = 0 gives 1, like a VMM error, again as in QEMU)
"""

from __future__ import annotations

import argparse
import sys

from .cli_run import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_VMM_ERROR
from .stop import StopReason


class UsageError(Exception):
    pass


def _check_boot_args(args) -> None:
    """Every file and value argument, checked before anything is built (pykvm/cli_checks.py)."""
    from . import cli_checks
    cli_checks.boot_args(args)


def _say(msg: str) -> None:
    print(f"pykvm: {msg}", file=sys.stderr, flush=True)


def cmd_info(args) -> int:
    from . import pvm
    from .kvm import Kvm
    from .kvm.system import CAPABILITIES, DEV_KVM
    kind = pvm.host_kind()
    with Kvm(args.device) as kvm:
        caps = kvm.capabilities()
        print(f"KVM device:       {args.device or DEV_KVM}")
        print(f"API version:      {kvm.api_version}")
        print(f"host kind:        {kind}")
        print(f"max vCPUs:        {kvm.max_vcpus} (recommended {caps['NR_VCPUS']})")
        print(f"pykvm boot:       1 vCPU by default (--cpus N, up to {kvm.max_vcpus}), "
              "ACPI tables on (--no-acpi: MP table only)")
        print(f"memory slots:     {caps['NR_MEMSLOTS']}")
        print(f"vCPU mmap size:   {kvm.vcpu_mmap_size} bytes")
        print(f"supported CPUID:  {kvm.supported_cpuid().nent} leaves")
        print("capabilities:")
        for name in CAPABILITIES:
            if name in ("NR_VCPUS", "MAX_VCPUS", "NR_MEMSLOTS"):
                continue
            value = caps[name]
            shown = "yes" if value == 1 else ("no" if value == 0 else f"yes ({value})")
            print(f"  {name.lower():24} {shown}")
    if kind == "KVM-PVM":
        print()
        print(pvm.host_notice(kind))
    return EXIT_OK


def cmd_boot(args) -> int:
    from .config import BootConfig, DeviceConfig, LinuxConfig, MachineConfig
    from .cli_run import exit_status, run_on_console, stop_on_sigterm
    from .linux import LinuxVM, parse_size

    if args.readonly and args.snapshot:
        raise UsageError("--readonly and --snapshot exclude each other: pick one")
    if (args.readonly or args.snapshot) and not args.disk:
        raise UsageError("--readonly and --snapshot apply to a DISK image; none was given")
    net_tap = None
    if args.net:
        kind, _, name = args.net.partition(":")
        if kind != "tap":
            raise UsageError(f"--net {args.net}: only tap[:NAME] is supported")
        net_tap = name or "pykvm%d"
    from .snapshot import cli as snapshot_cli
    snapshot_cli.check_boot_options(args, UsageError)
    _check_boot_args(args)
    memory = parse_size(args.memory)
    test_devices = _test_devices(args)
    gdb_address = _gdb_address(args)
    # --no-pvm-workarounds: False (never); without it None (when the host is KVM-PVM).
    machine = MachineConfig(memory=memory, irqchip=args.irqchip, fast_path=not args.no_fast_path,
                            pvm_workarounds=False if args.no_pvm_workarounds else None,
                            pvm_skip_busywork=not args.no_pvm_skip_busywork,
                            acpi=not args.no_acpi, cpus=args.cpus)
    from .multiboot_vm import looks_multiboot
    if looks_multiboot(args.kernel):
        vm = _multiboot_vm(args, machine)
    elif args.module:
        raise UsageError(f"--module is for multiboot kernels; {args.kernel} has no multiboot header")
    else:
        config = LinuxConfig(
            BootConfig(args.kernel, initrd=args.initrd, append=args.append or "",
                       decompress=not args.no_decompress),
            machine,
            DeviceConfig(disk=args.disk, disk_bus=args.disk_bus, readonly=args.readonly,
                         snapshot=args.snapshot, rng=args.rng, net_tap=net_tap,
                         console="hvc0" if args.hvc else "ttyS0"),
            until=args.until or args.save_at)
        vm = LinuxVM(config)
    with vm, stop_on_sigterm(vm.machine):
        from .testdevs import add_test_devices
        add_test_devices(vm.machine, **test_devices)
        vm.test_devices = test_devices      # a snapshot records them (pykvm/snapshot/linux.py)
        stub = _start_gdb(vm, args, gdb_address)
        profiler = None
        if args.profile:
            from .profile import GuestProfiler
            profiler = GuestProfiler(None if args.profile == "-" else args.profile)
            profiler.start(vm.machine)
        if args.trace:
            from .trace import ExitTracer
            # Line-buffered: a write the host refuses shows up at the exit that wrote it.
            trace_out = sys.stderr if args.trace == "-" else open(args.trace, "w", buffering=1)
            vm.machine.trace = ExitTracer(vm.machine, trace_out)
        if vm.host_kind == "KVM-PVM" and vm.pvm_workarounds:
            from . import pvm
            _say(pvm.host_notice(vm.host_kind))
            if vm.added_pvm_args:
                _say("added kernel arguments for this host: " + " ".join(vm.added_pvm_args))
            if getattr(vm, "skipped_busywork", None):      # a MultibootVM has none
                _say("skipping boot work only guest userland would notice (--no-pvm-skip-busywork "
                     "keeps it; pykvm/pvm/busywork.py says why each): "
                     + " ".join(vm.skipped_busywork))
        desc = vm.plan.description
        _say(f"booting {desc.get('format', 'kernel')} {desc.get('kernel_version', '').split(' ')[0]} with "
             f"{memory >> 20} MiB, {_machine_summary(vm)}; command line: {vm.cmdline}")
        stop, saved = run_on_console(vm, args, _say)
        if stub is not None:
            stub.close()
        if saved is not None:
            return saved
        if profiler is not None:
            profiler.stop()
            _say("guest profile:\n" + profiler.report())
        if args.stats:
            _say(f"stats: {vm.stats}")
        gap = vm.machine.last_internal_error
        if stop.reason is StopReason.ERROR and gap is not None:
            from . import pvm
            _say(pvm.describe_gap(vm.machine, gap))
        return exit_status(stop)


def _multiboot_vm(args, machine):
    """A multiboot kernel (pykvm/multiboot_vm.py) on the same MachineConfig a Linux kernel gets:
    --initrd and --module FILE[,ARGS] are its modules; the Linux-only options are refused."""
    from . import cli_checks
    from .multiboot_vm import MultibootVM
    for flag, given in (("DISK", args.disk), ("--net", args.net), ("--rng", args.rng),
                        ("--hvc", args.hvc), ("--profile", args.profile),
                        ("--save-to", args.save_to)):
        if given:
            raise UsageError(f"{flag} is not supported with a multiboot kernel")
    modules = []
    for spec in args.module:
        path, _, margs = spec.partition(",")
        cli_checks.input_file(path, "--module", cli_checks.MAX_INITRD)
        modules.append((path, margs))
    return MultibootVM(args.kernel, append=args.append or "", initrd=args.initrd, modules=modules,
                       machine=machine, until=args.until)


def _gdb_address(args):
    """--gdb tcp::PORT, checked before anything is built."""
    if args.gdb_wait and not args.gdb:
        raise UsageError("--gdb-wait needs --gdb tcp::PORT")
    if not args.gdb:
        return None
    from .gdb import GdbError, parse_address
    try:
        return parse_address(args.gdb)
    except GdbError as e:
        raise UsageError(str(e)) from None


def _start_gdb(vm, args, address):
    """The gdb stub (pykvm/gdb/): i386 registers for a multiboot kernel, x86-64 otherwise."""
    if address is None:
        return None
    from .gdb import GdbError, GdbStub
    from .multiboot_vm import MultibootVM
    from .gdb import linux_text_mapping
    multiboot = isinstance(vm, MultibootVM)
    stub = GdbStub(vm.machine, address=address, wait=args.gdb_wait, host_kind=vm.host_kind,
                   arch="i386" if multiboot else "i386:x86-64",
                   early_translate=None if multiboot else linux_text_mapping,
                   user_traps=None if multiboot else False)   # Linux: no userland on KVM-PVM
    try:
        stub.start()
    except GdbError as e:
        raise UsageError(str(e)) from None
    return stub


def _test_devices(args) -> dict:
    """--debug-exit, --fw-cfg, --testdev, checked before anything is built: the keyword arguments
    of pykvm.testdevs.add_test_devices (fw_cfg and port 0x8900 are always added)."""
    from .devices.debug_exit import parse_spec
    from .testdevs import parse_fw_cfg
    debug_exit = None
    if args.debug_exit is not None:
        try:
            debug_exit = parse_spec(args.debug_exit)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return dict(debug_exit=debug_exit, testdev=args.testdev,
                fw_cfg_files=[parse_fw_cfg(spec) for spec in args.fw_cfg])


def cmd_selftest(args) -> int:
    from .lane.selftest import selftest
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    from . import cli_checks
    args.timeout = cli_checks.timeout(args.timeout)    # positive, finite, waitable (not inf/nan)
    return selftest(command, timeout=args.timeout, keep=args.keep)


def _machine_summary(vm) -> str:
    from .multiboot_vm import MultibootVM
    cpus = len(vm.machine.vcpus)
    if isinstance(vm, MultibootVM):
        tables = "no ACPI or MP table (fw_cfg has the vCPU count)"
    else:
        tables = "ACPI" if vm.acpi is not None else "no ACPI (MP table)"
    return f"{cpus} vCPU{'s' if cpus != 1 else ''}, {tables}"


def add_run_options(parser: argparse.ArgumentParser, gdb: bool = True) -> None:
    """--timeout, --until and --console: how a run ends and where its console goes, the same for
    `pykvm boot` and `pykvm restore` (pykvm/snapshot/cli.py; `gdb`: the command has --gdb)."""
    parser.add_argument("--timeout", type=float,
                        help="stop after the guest has run this many seconds (exit status 4)"
                             + ("; time gdb holds it stopped does not count" if gdb else ""))
    parser.add_argument("--until", metavar="REGEX",
                        help="stop with status 0 when a console line matches REGEX")
    parser.add_argument("--console", default="stdio", metavar="stdio|none|FILE",
                        help="where the guest console goes (default: the terminal)")


def build_parser() -> argparse.ArgumentParser:
    from .config import DISK_BUSES, IRQCHIPS
    p = argparse.ArgumentParser(prog="pykvm", description="A virtual machine monitor in Python on Linux KVM.")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="what this host's KVM offers",
                          description="Say what this host's KVM offers: the device and API "
                          "version, whether it is VT-x, AMD-V or KVM-PVM (and what that means for "
                          "guests), the vCPU limits and the capabilities pykvm uses.")
    info.add_argument("--device", default=None, help="the KVM device (default /dev/kvm, or $PYKVM_KVM_DEVICE)")
    info.set_defaults(fn=cmd_info)

    boot = sub.add_parser("boot", help="boot a Linux kernel",
                          description="Boot a Linux kernel (bzImage or ELF vmlinux), or a multiboot kernel. The serial "
                          "console is on the terminal: Ctrl-A x quits, Ctrl-A h helps.")
    boot.add_argument("kernel", help="bzImage or vmlinux")
    boot.add_argument("disk", nargs="?", help="raw disk image: the guest's /dev/vda (virtio-blk), "
                      "root=/dev/vda unless --append gives a root=")
    boot.add_argument("--disk-bus", choices=DISK_BUSES, default="virtio-mmio",
                      help="how the disk is attached: virtio-blk over virtio-mmio (/dev/vda, the "
                      "default) or virtio-pci (/dev/vda), or IDE (/dev/sda)")
    boot.add_argument("--readonly", action="store_true", help="the guest cannot write the disk")
    boot.add_argument("--snapshot", action="store_true",
                      help="guest writes go to a temporary overlay; the disk image stays unchanged")
    boot.add_argument("--rng", action="store_true", help="add a virtio-rng fed from the host's random source")
    boot.add_argument("--net", metavar="tap[:NAME]", help="virtio-net on a host tap device")
    boot.add_argument("--hvc", action="store_true",
                      help="kernel console on a virtio-console (console=hvc0) instead of COM1")
    boot.add_argument("--initrd", help="initramfs (cpio, optionally compressed)")
    boot.add_argument("--append", help="extra kernel command line arguments")
    boot.add_argument("--memory", "-m", default="256M", help="guest RAM (default 256M)")
    add_run_options(boot)
    boot.add_argument("--no-decompress", action="store_true",
                      help="let the kernel decompress itself (classic bzImage boot)")
    boot.add_argument("--no-pvm-workarounds", action="store_true",
                      help="on KVM-PVM hosts, do not add kernel arguments or complete emulation gaps")
    boot.add_argument("--no-pvm-skip-busywork", action="store_true",
                      help="on KVM-PVM hosts, do not add the arguments that skip boot work only "
                      "guest userland would notice (crypto self-tests, tracefs, BPF kfuncs, ...)")
    boot.add_argument("--cpus", default="1", metavar="N",
                      help="how many vCPUs (default 1; each runs on a thread of its own; more "
                      "than one needs --irqchip kernel)")
    boot.add_argument("--no-acpi", action="store_true",
                      help="no ACPI tables: the MP table describes the machine (power-off is "
                      "seen on the console, reboot goes through the i8042)")
    boot.add_argument("--irqchip", choices=IRQCHIPS, default="kernel",
                      help="interrupt controllers and PIT in KVM (default) or in pykvm's Python models")
    boot.add_argument("--no-fast-path", action="store_true",
                      help="handle every exit in Python (no C run loop): slower, for teaching")
    boot.add_argument("--trace", metavar="FILE",
                      help="write one line per exit that reaches Python to FILE (- for stderr)")
    boot.add_argument("--stats", action="store_true", help="print exit statistics at the end")
    boot.add_argument("--profile", metavar="SYSTEM_MAP",
                      help="sample the guest's RIP every 10 ms and print the hottest kernel "
                           "functions at the end (- for raw addresses)")
    boot.add_argument("--module", action="append", default=[], metavar="FILE[,ARGS]",
                      help="a boot module for a multiboot kernel (repeatable; --initrd is the first)")
    boot.add_argument("--gdb", metavar="tcp::PORT",
                      help="serve gdb's remote protocol on this port (127.0.0.1 unless "
                           "tcp:HOST:PORT): gdb vmlinux -ex 'target remote :PORT'")
    boot.add_argument("--gdb-wait", action="store_true",
                      help="with --gdb: hold the guest before its first instruction until gdb "
                           "attaches and continues")
    boot.add_argument("--debug-exit", nargs="?", const="", metavar="PORT[,SIZE]",
                      help="QEMU's isa-debug-exit (default 0xf4,4): a write of v ends pykvm "
                           "with exit status (v << 1) | 1")
    boot.add_argument("--fw-cfg", action="append", default=[], metavar="name=opt/X,file=PATH",
                      help="a fw_cfg file item, as QEMU's -fw_cfg (or string=TEXT); repeatable")
    boot.add_argument("--testdev", action="store_true",
                      help="QEMU's pc-testdev: scratch ports 0xe0/0xe8, IRQ lines at 0x2000")
    from .snapshot import cli as snapshot_cli
    snapshot_cli.add_save_options(boot)
    boot.set_defaults(fn=cmd_boot)

    selftest = sub.add_parser("selftest", help="run a check (or COMMAND) on AMD-V in the AMD-V lane",
                              description="Boot the AMD-V lane (Debian's kernel under QEMU TCG with SVM, "
                              "this host's / read-only over 9p) and check pykvm there: `pykvm info` says "
                              "AMD-V and the test kernel reaches userland. With COMMAND, run it there in "
                              "the current directory instead; its exit status is ours.")
    selftest.add_argument("--timeout", type=float, default=900, help="stop the lane after this many "
                          "seconds (exit status 124; default 900)")
    selftest.add_argument("--keep", action="store_true", help="keep the run directory (the writable "
                          "share, with the L1 console and the command's output)")
    selftest.add_argument("command", nargs=argparse.REMAINDER, help="command to run instead of the check")
    selftest.set_defaults(fn=cmd_selftest)
    snapshot_cli.add_restore_command(sub, lambda args: snapshot_cli.cmd_restore(args, _say))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .assets.errors import AssetError
    from .boot import BootError
    from .kvm import KvmError, KvmUnavailable
    from .host.tap import TapError
    from .machine import MachineError
    from .lane import LaneError
    from .snapshot import SnapshotError
    try:
        return args.fn(args)
    except (UsageError, MachineError, BootError, KvmUnavailable, AssetError, TapError, LaneError,
            SnapshotError) as e:
        _say(f"error: {e}")
        return EXIT_BAD_INPUT
    except KvmError as e:
        _say(f"error: {e}")
        return EXIT_VMM_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
