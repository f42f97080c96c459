"""Run a firmware program (firmware/) under Debian's gdb in batch mode, attached to pykvm's gdb
stub (pykvm/gdb/): for tests and examples/07_gdb.py.

    result, transcript = debug_firmware("hello", ["break main", "continue", "info registers rip"])

The guest is held before its first instruction (real mode, 0:0x8000) until gdb continues; gdb
gets the firmware ELF for its symbols. `interrupt=True` sends gdb a SIGINT (what Ctrl-C does at
its prompt) once the guest has been let run for the first time and `interrupt_delay` seconds have
passed: gdb then stops the guest wherever it is, and goes on with the next command.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

from .firmware import FirmwareResult, build, run_firmware


def gdb_path() -> str | None:
    return shutil.which("gdb")


def debug_firmware(name: str, commands: list[str], *, cpl: int = 3, args=(),
                   interrupt: bool = False, interrupt_delay: float = 0.5,
                   timeout: float = 60) -> tuple[FirmwareResult, str]:
    """Boot `name` with the stub listening on a free loopback port, run `gdb -batch` with
    `commands` against it, and return how the firmware ended and everything gdb printed."""
    from ..gdb import GdbStub
    gdb = gdb_path()
    if gdb is None:
        raise FileNotFoundError("gdb is not installed (Debian: apt-get install gdb)")
    elf = build(name)
    box: dict = {}

    def setup(machine) -> None:
        quiet = None if os.environ.get("PYKVM_GDB_TRACE") else (lambda msg: None)
        stub = GdbStub(machine, address=("127.0.0.1", 0), wait=True, log=quiet)
        stub.start()
        box["stub"] = stub
        argv = [gdb, "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{stub.port}"]
        for c in commands:
            argv += ["-ex", c]
        proc = subprocess.Popen(argv + [str(elf)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        box["proc"] = proc

        def interrupter() -> None:
            if stub.resumed.wait(timeout):
                time.sleep(interrupt_delay)
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGINT)
        if interrupt:
            threading.Thread(target=interrupter, daemon=True).start()

    try:
        result = run_firmware(name, cpl=cpl, args=args, setup=setup, timeout=timeout)
    finally:
        stub = box.get("stub")
        if stub is not None:
            stub.close()
    proc = box["proc"]
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return result, out
