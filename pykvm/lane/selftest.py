"""``pykvm selftest [--timeout S] [--keep] [-- COMMAND ...]``: pykvm on a real AMD-V /dev/kvm, here.

With no command: boots the lane and runs :mod:`.check` in it (``pykvm info`` says AMD-V, and the
test kernel reaches its busybox userland). With a command: runs it in the lane, in the current
directory with the current environment, its output on our stdout.

Exit status (also in the README):
    0      the check passed / the command exited 0
    1      the check failed
    N      with a command: the command's own exit status
    2      bad input, QEMU not installed, an asset could not be had
    124    the lane timed out (--timeout)
    125    the lane failed: QEMU or L1 stopped before the command reported its status
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..assets.progress import Progress
from .qemu import qemu_binary
from .runner import check_cwd, cleanup, run

L1_CONSOLE_TAIL = 30


def _stdout(chunk: bytes) -> None:
    try:
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    except (BrokenPipeError, OSError):
        pass


def selftest(command: list[str], *, timeout: float, keep: bool = False) -> int:
    progress = Progress("selftest")
    qemu_binary()  # before building anything: say at once what is missing
    check_cwd(Path.cwd().resolve())
    if not command:
        from ..assets import initramfs, test_kernel
        kernel, initrd = test_kernel(progress=progress), initramfs(progress=progress)
        command = [sys.executable, "-m", "pykvm.lane.check", str(kernel.bzimage), str(initrd)]
    result = run(command, timeout=timeout, output=_stdout, progress=progress)
    if result.error is not None:
        print(f"pykvm: error: {result.error}", file=sys.stderr)
        print(f"pykvm: L1 console, last {L1_CONSOLE_TAIL} lines:\n{result.console_tail(L1_CONSOLE_TAIL)}",
              file=sys.stderr)
    if keep or result.error is not None:
        progress.say(f"run directory kept: {result.run_dir}")
    else:
        cleanup(result)
    return result.status
