"""How `pykvm boot` and `pykvm restore` run a VM once it is built: one block for both.

    with vm, stop_on_sigterm(vm.machine):
        stop, saved = run_on_console(vm, args, say)     # console, Ctrl-A x, SIGUSR1, --timeout
        return saved if saved is not None else exit_status(stop)

The guest console goes where `--console` says (the terminal, a file, nowhere); on a terminal the
keys go to the guest and Ctrl-A x stops it; `--save-to` makes SIGUSR1 stop the run so that the VM
can be saved (pykvm/snapshot/cli.py), and a save happens after the stop is reported; SIGTERM ends
the run as Ctrl-C does. What a stop means for the shell is `exit_status` (the table is in
pykvm/cli.py's docstring and the README).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from .stop import Stop, StopReason

EXIT_OK, EXIT_VMM_ERROR, EXIT_BAD_INPUT, EXIT_PANIC, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

STOP_STATUS = {
    StopReason.POWEROFF: EXIT_OK, StopReason.HALT: EXIT_OK, StopReason.RESET: EXIT_OK,
    StopReason.UNTIL: EXIT_OK, StopReason.EXIT: EXIT_OK,
    StopReason.PANIC: EXIT_PANIC, StopReason.TIMEOUT: EXIT_TIMEOUT,
    StopReason.INTERRUPTED: EXIT_INTERRUPTED,
    StopReason.SHUTDOWN: EXIT_VMM_ERROR, StopReason.ERROR: EXIT_VMM_ERROR,
    # The guest chose the status: exit_status returns stop.status (QEMU's (v << 1) | 1) instead;
    # this entry only stands where the status is lost (a stop without one).
    StopReason.DEBUG_EXIT: EXIT_VMM_ERROR,
}


def exit_status(stop: Stop) -> int:
    """The process's exit status for how the run ended."""
    if stop.reason is StopReason.DEBUG_EXIT and stop.status is not None:
        return stop.status & 0xFF
    return STOP_STATUS.get(stop.reason, EXIT_VMM_ERROR)


def run_on_console(vm, args, say) -> tuple[Stop, int | None]:
    """Run `vm` (a LinuxVM or MultibootVM, built and not started) until it stops, with its console
    where args.console says, for at most args.timeout seconds; save it if args.save_to/--save-at
    asked for it. Returns the stop, and the exit status to use instead of exit_status(stop) if
    the VM was saved (else None)."""
    from .host.terminal import Terminal
    from .snapshot import cli as snapshot_cli
    log = None
    interactive = args.console == "stdio"
    if interactive:
        vm.console.tee(terminal_sink(sys.stdout.buffer, raw=os.isatty(1) and os.isatty(0)))
    elif args.console != "none":
        log = open(args.console, "wb", buffering=0)    # unbuffered: close() has nothing to write
        vm.console.tee_file(log, on_error=lambda e: vm.machine.request_stop(Stop(
            StopReason.ERROR, message=f"cannot write --console {args.console}: {e.strerror or e}")))
    saver = snapshot_cli.SaveOnSignal(vm) if args.save_to else None
    try:
        if interactive and os.isatty(0):
            def quit_():
                vm.machine.request_stop(Stop(StopReason.INTERRUPTED, message="Ctrl-A x"))
            with Terminal(vm.send, quit_, on_stats=lambda: str(vm.stats),
                          on_error=vm.machine.worker_failed):
                stop = vm.run(args.timeout)
        else:
            stop = vm.run(args.timeout)
    finally:
        if saver:
            saver.close()
        if log:
            log.close()
    print(file=sys.stderr)            # the guest's last line may not have ended
    say(f"stopped: {stop.reason}: {stop.message}")
    return stop, snapshot_cli.save_after_run(vm, args, stop, say)


@contextlib.contextmanager
def stop_on_sigterm(machine):
    """SIGTERM (`kill`, systemd, a CI runner's cancel) stops the guest like Ctrl-C does, so the
    run ends normally: disks flushed and closed, exit status 130. Python's default would be to
    die at once, with the guest's last writes unflushed."""

    def on_term(signum, frame):
        machine.request_stop(Stop(StopReason.INTERRUPTED, message="SIGTERM"))

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:          # not the main thread: leave signals to whoever owns them
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def terminal_sink(out, raw: bool):
    """Guest console bytes to our stdout. A terminal in raw mode needs CR before LF. If stdout goes
    away (a closed pipe: `pykvm boot ... | head`), the guest keeps running and its output is
    dropped, rather than the VMM dying in the middle of a device access."""
    state = {"open": True}

    def write(data: bytes) -> None:
        if not state["open"]:
            return
        try:
            out.write(data.replace(b"\n", b"\r\n") if raw else data)
            out.flush()
        except (BrokenPipeError, OSError):
            state["open"] = False

    return write
