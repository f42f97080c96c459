"""Why a run loop ended: a `Stop` value with a `StopReason`.

`StopReason` is a `str` enum, so `stop.reason == "until"`, `f"{stop.reason}"` and dictionaries keyed
by the plain strings keep working, while a misspelt reason fails where the Stop is made
(`Stop("untill")` raises ValueError) instead of never matching anywhere. A new kind of stop is one
more member here, and one more row in the CLI's exit-status table (pykvm/cli_run.py, STOP_STATUS).
"""

from __future__ import annotations

import enum

from .record import FrozenRecord


class StopReason(enum.StrEnum):
    EXIT = "exit"                # a firmware program wrote its status to the exit port
    HALT = "halt"                # hlt with interrupts off: nothing can wake the CPU
    SHUTDOWN = "shutdown"        # triple fault
    RESET = "reset"              # the guest asked to reboot
    POWEROFF = "poweroff"        # the guest powered off
    PANIC = "panic"              # the guest kernel panicked or reported a crash
    UNTIL = "until"              # an awaited console line appeared
    TIMEOUT = "timeout"          # the VMM's time limit passed
    INTERRUPTED = "interrupted"  # Ctrl-C, or stop() from the VMM
    ERROR = "error"              # the VMM could not go on
    DEBUG_EXIT = "debug-exit"    # QEMU's isa-debug-exit: status is the process exit status,
                                 # (value << 1) | 1 (pykvm/devices/debug_exit.py)


class Stop(FrozenRecord):
    """Why the run loop ended: a reason, the guest's status where it gave one (the exit port), and a
    sentence for people. `reason` may be given as its string; it is always a StopReason after."""

    __slots__ = ("reason", "status", "message")

    def __init__(self, reason: StopReason | str, status: int | None = None,
                 message: str = "") -> None:
        if type(reason) is not StopReason:
            reason = StopReason(reason)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "message", message)
