"""`pykvm boot --save-at/--save-to` and `pykvm restore`: the command line's side of snapshots.

    pykvm boot bzImage --initrd rd --save-at 'Run /init' --save-to vm.snap   # boot, save, stop
    pykvm boot bzImage --initrd rd --save-to vm.snap      # ... save when sent SIGUSR1
    pykvm restore vm.snap [--until REGEX] [--console FILE] [--timeout S] [--clone] [--verify]

`pykvm restore` exit status: as `pykvm boot` (0 stopped as asked, 1 VMM error, 3 panic, 4
timeout, 130 interrupted), and 2 for a snapshot it cannot use - not a snapshot, truncated,
corrupted, another format version, taken on another kind of host, or a disk image that changed
since - with a one-line message.
"""

from __future__ import annotations

import signal

SAVE_SIGNAL = signal.SIGUSR1


def add_save_options(parser) -> None:
    """--save-at and --save-to, the same for `pykvm boot` and `pykvm restore`."""
    parser.add_argument("--save-at", metavar="REGEX",
                        help="when a console line matches REGEX, save the VM to --save-to and stop")
    parser.add_argument("--save-to", metavar="FILE",
                        help="snapshot file: written at --save-at, or when pykvm gets SIGUSR1 "
                             "(then the run stops, status 0)")


def check_boot_options(args, usage_error) -> None:
    if args.save_at and not args.save_to:
        raise usage_error("--save-at needs --save-to FILE")
    if args.save_at and args.until:
        raise usage_error("--save-at and --until both stop the boot: give one")


class SaveOnSignal:
    """SIGUSR1 stops the VM so that it can be saved (the vCPU must be out of KVM_RUN)."""

    def __init__(self, vm):
        from pykvm.stop import Stop, StopReason
        self.requested = False

        def handler(signum, frame):
            self.requested = True
            vm.machine.request_stop(Stop(StopReason.INTERRUPTED, message="SIGUSR1: saving"))
        self._old = signal.signal(SAVE_SIGNAL, handler)

    def close(self) -> None:
        signal.signal(SAVE_SIGNAL, self._old)


def save_after_run(vm, args, stop, say) -> int | None:
    """After `pykvm boot` or `pykvm restore` stopped: save if asked. Returns an exit status to use instead of the
    stop's, or None."""
    from pykvm.stop import StopReason
    if not args.save_to:
        return None
    by_signal = stop.reason is StopReason.INTERRUPTED and "SIGUSR1" in stop.message
    if not (by_signal or (args.save_at and stop.reason is StopReason.UNTIL)):
        return None
    size = vm.save(args.save_to)
    say(f"saved to {args.save_to} ({size >> 20} MiB, sparse)")
    return 0


def add_restore_command(sub, run_fn) -> None:
    p = sub.add_parser("restore", help="run a VM saved with --save-to / vm.save()",
                       description="Restore a saved VM in this process and run it on from where "
                       "it stopped. Exit status as for boot; 2 for a snapshot that cannot be used.")
    from pykvm.cli import add_run_options      # at call time: pykvm.cli imports this module
    p.add_argument("snapshot", help="snapshot file")
    add_run_options(p, gdb=False)      # a restore offers no --gdb
    p.add_argument("--clone", action="store_true",
                   help="give this VM its own identity (a new VM generation ID, on which "
                        "Linux reseeds its CRNG; a new MAC; fresh virtio-rng entropy)")
    p.add_argument("--verify", action="store_true",
                   help="check guest RAM's checksum first (reads the whole file)")
    add_save_options(p)
    p.set_defaults(fn=run_fn)


def cmd_restore(args, say) -> int:
    from pykvm import cli_checks
    from pykvm.cli_run import exit_status, run_on_console, stop_on_sigterm
    from pykvm.linux import LinuxVM
    from pykvm.snapshot import SnapshotError

    if args.save_at and not args.save_to:
        say("error: --save-at needs --save-to FILE")
        return 2
    try:
        cli_checks.restore_args(args)     # files and values checked up front (pykvm/cli_checks.py)
    except cli_checks.InputError as e:
        say(f"error: {e}")
        return 2
    try:
        vm = LinuxVM.restore(args.snapshot, until=args.until or args.save_at, clone=args.clone,
                             verify=args.verify)
    except SnapshotError as e:
        say(f"error: {e}")
        return 2
    with vm, stop_on_sigterm(vm.machine):     # the same run block as boot (pykvm/cli_run.py)
        stop, saved = run_on_console(vm, args, say)
        return saved if saved is not None else exit_status(stop)
