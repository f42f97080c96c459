"""Checking what a user hands pykvm, before anything is built: files, sizes, numbers, patterns.

Every check either returns the value in the form pykvm uses (a `Path`, a byte count, a compiled
pattern, ...) or raises `InputError` with one line that names the argument and says what to do.
`pykvm boot` (pykvm/cli.py) runs them all up front, so a bad argument costs no VM set-up and never
ends in a traceback; `LinuxVM` and `DiskImage` call the file checks again, so library users get the
same message. Other commands (`pykvm restore`, ...) should use these same functions.

Why each one exists (the failures seen on main before them, issue 15):
- input files are opened with O_NONBLOCK and checked with fstat *after* opening: a FIFO given as a
  kernel used to block `open()` forever, and `/dev/zero` was read until memory ran out. Only
  regular files (and, for disks, block devices) are accepted, and only up to a size limit.
- numbers go through `math.isfinite` before any int(): `--memory infG` and `1e30G` raised
  OverflowError, `--timeout inf` killed the timer thread.
- `--memory` is compared with the host's RAM: an anonymous mapping larger than the host fails in
  mmap() with ENOMEM.
- root passes every `access()` check, so a read-only (mode 0444) disk image would be opened for
  writing without a word: the mode bits are checked instead.
"""

from __future__ import annotations

import math
import os
import re
import stat
import threading
from pathlib import Path

from .kvm.headers import IFNAMSIZ     # <linux/if.h>: interface names, with their NUL
from .machine import MachineError
# MIN_MEMORY: below it Linux cannot unpack itself
from .x86.layout import MIN_MEMORY, SECTOR, GiB, KiB, MiB

# Size limits for the files pykvm reads whole into memory. A bzImage is ~5-15 MiB and a vmlinux
# with DWARF a few hundred; an initramfs must also fit in guest RAM (checked against --memory).
MAX_KERNEL = 1 * GiB
MAX_INITRD = 4 * GiB
MAX_SYSTEM_MAP = 256 * MiB
MAX_MEMORY = 1 << 40          # 1 TiB: far beyond any machine pykvm runs on


class InputError(MachineError):
    """A bad argument or input file. One line; the CLI exits with status 2 (bad input).

    A MachineError, so library code that caught MachineError for a missing kernel still does."""


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _open_error(e: OSError, path, what: str) -> InputError:
    if not os.fspath(path):      # `pykvm boot ''` (an unset shell variable): "kernel  does not..."
        return InputError(f"{what}: an empty file name")
    if isinstance(e, FileNotFoundError):
        return InputError(f"{what} {path} does not exist")
    if isinstance(e, IsADirectoryError):
        return InputError(f"{what} {path} is a directory, not a file")
    if isinstance(e, PermissionError):
        return InputError(f"{what} {path} is not readable by this user")
    if isinstance(e, NotADirectoryError):
        return InputError(f"{what} {path}: a component of the path is not a directory")
    return InputError(f"{what} {path}: {e.strerror or e}")


def _open_input(path: str | os.PathLike, what: str) -> int:
    """Open for reading with O_NONBLOCK (a FIFO cannot block the open); a failure is one line."""
    try:
        return os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _open_error(e, path, what) from None


def _check_file(st: os.stat_result, path, what: str, limit: int) -> None:
    """A regular file of at most `limit` bytes, by the fstat of its open descriptor."""
    kind = _kind(st.st_mode)
    if kind is not None:
        raise InputError(f"{what} {path} is {kind}, not a file")
    if st.st_size > limit:
        raise InputError(f"{what} {path} is {st.st_size >> 20} MiB, more than the "
                         f"{limit >> 20} MiB a {what} can be")


def read_input(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """Read a whole input file (a kernel, an initrd, a System.map) of at most `limit` bytes.

    Opened with O_NONBLOCK so that a FIFO cannot block the open, then checked with fstat on the
    open descriptor (no window between check and use): only a regular file is read."""
    fd = _open_input(path, what)
    try:
        _check_file(os.fstat(fd), path, what, limit)
        chunks, total = [], 0
        while True:
            try:
                chunk = os.read(fd, min(16 * MiB, limit + 1 - total))
            except OSError as e:
                raise InputError(f"{what} {path}: read failed: {e.strerror}") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:       # the file grew while we read it
                raise InputError(f"{what} {path} is larger than the {limit >> 20} MiB a {what} "
                                 "can be")
        return b"".join(chunks)
    finally:
        os.close(fd)


def input_file(path: str | os.PathLike, what: str, limit: int) -> Path:
    """Check that `path` is a readable regular file of at most `limit` bytes (without reading it)."""
    fd = _open_input(path, what)
    try:
        _check_file(os.fstat(fd), path, what, limit)
    finally:
        os.close(fd)
    return Path(path)


def disk_image(path: str | os.PathLike, *, writable: bool) -> Path:
    """Check a raw disk image: a regular file or block device, readable (and writable unless
    `writable` is False), a whole number of 512-byte sectors, not empty.

    Writability is judged from the mode bits as well as access(2): root passes access() for any
    file, and a mode-0444 image says its owner wants it left alone."""
    what = "disk image"
    try:
        st = os.stat(path)
    except OSError as e:
        raise _open_error(e, path, what) from None
    is_block = stat.S_ISBLK(st.st_mode)
    kind = _kind(st.st_mode)
    if kind is not None and not is_block:
        raise InputError(f"{what} {path} is {kind}, not a file or block device")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path} is not readable by this user")
    if writable:
        hint = "(--readonly or --snapshot boot it without writing)"
        if not os.access(path, os.W_OK):
            raise InputError(f"{what} {path} is not writable by this user {hint}")
        if not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            raise InputError(f"{what} {path} is read-only (mode {stat.S_IMODE(st.st_mode):04o}); "
                             f"pykvm will not write it even as root {hint}")
    size = st.st_size
    if is_block:
        try:
            fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        except OSError as e:
            raise _open_error(e, path, what) from None
    if size == 0:
        raise InputError(f"{what} {path} is empty: a disk needs at least one 512-byte sector")
    if size % SECTOR:
        raise InputError(f"{what} {path} is {size} bytes, not a whole number of 512-byte sectors "
                         f"(truncate -s {(size + SECTOR - 1) // SECTOR * SECTOR} pads it)")
    return Path(path)


def output_file(path: str, what: str, *, dash_ok: bool = False) -> str:
    """Check that `path` can be created or overwritten: its folder exists and is writable, and
    the path is not a directory. "-" (stdout/stderr) is accepted when `dash_ok`."""
    if dash_ok and path == "-":
        return path
    if not path:
        raise InputError(f"{what}: an empty file name")
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {path} is a directory; give a file name")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{what} {path}: folder {folder} does not exist")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise InputError(f"{what} {path} exists and is not writable by this user")
        mode = os.stat(p).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
            raise InputError(f"{what} {path} is {_kind(mode)}, not a file")
        if stat.S_ISFIFO(mode):
            # Opening a FIFO for writing blocks until something reads it: with nobody there,
            # pykvm would hang before the guest starts. A non-blocking open says ENXIO instead.
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            except OSError:
                raise InputError(f"{what} {path} is a FIFO that nothing reads: start the reader "
                                 "first") from None
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: folder {folder} is not writable by this user")
    return path


_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?)(?:I?B|I)?\s*", re.I)
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}


def size(text: str | int, what: str = "memory size") -> int:
    """'256M', '1G', '1.5G', '65536K', '268435456' -> bytes. Only finite, non-negative decimal
    numbers with an optional K/M/G/T suffix (binary units, as QEMU's -m): "inf", "nan", hex and
    negative numbers are refused, and nothing is multiplied before it is known to be finite."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise InputError(f"cannot read {what} {text!r}: use e.g. 256M or 1G")
    if isinstance(text, int):
        if text < 0:
            raise InputError(f"{what} {text} is negative")
        return text
    m = _SIZE.fullmatch(text)
    if not m:
        raise InputError(f"cannot read {what} {text!r}: use e.g. 256M or 1G")
    number, unit = m.group(1), m.group(2).upper()
    value = float(number) if any(c in number for c in ".eE") else int(number)
    if not math.isfinite(value) or value > MAX_MEMORY:     # 1e400 parses as inf
        raise InputError(f"{what} {text!r} is too large (at most {MAX_MEMORY >> 30} GiB)")
    total = int(value * _UNITS[unit])
    if total > MAX_MEMORY:
        raise InputError(f"{what} {text!r} is too large (at most {MAX_MEMORY >> 30} GiB)")
    return total


def host_memory() -> int | None:
    """The host's RAM in bytes (MemTotal), or None if /proc/meminfo cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def too_little_memory(text: str | int, n: int, minimum: int = MIN_MEMORY) -> InputError:
    """The error for guest RAM below `minimum`, naming the amount as given: `--memory 512` is 512
    bytes (QEMU's -m would read MiB), which "0 MiB" would not explain."""
    amount = (f"{n >> 20} MiB" if n >= MiB and n % MiB == 0 else
              f"{n >> 10} KiB" if n >= KiB and n % KiB == 0 else f"{n} byte{'s' * (n != 1)}")
    bare = isinstance(text, str) and text.strip()[-1:].isdigit()
    hint = "; a number with no K, M, G or T counts bytes: 256M is 256 MiB" if bare else ""
    return InputError(f"{amount} of memory is too little for Linux: give at least "
                      f"{minimum >> 20} MiB (--memory{hint})")


def memory(text: str | int, *, minimum: int = MIN_MEMORY) -> int:
    """Guest RAM: a size (see `size`) of at least `minimum`, a multiple of 4 KiB, and no more than
    the host has (a larger anonymous mapping fails in mmap with ENOMEM)."""
    n = size(text)
    if n < minimum:
        raise too_little_memory(text, n, minimum)
    if n % 4096:
        raise InputError(f"memory size {text!r} is not a whole number of 4 KiB pages (--memory)")
    host = host_memory()
    if host is not None and n > host:
        raise InputError(f"--memory {text} is more than this host's {host >> 20} MiB of RAM")
    return n


def timeout(text: str | float | None) -> float | None:
    """Seconds: a finite positive number no larger than the longest wait threading supports."""
    if text is None:
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InputError(f"--timeout {text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"--timeout {text!r} must be a positive, finite number of seconds")
    if value > threading.TIMEOUT_MAX:
        raise InputError(f"--timeout {text!r} is longer than the {threading.TIMEOUT_MAX:.0f} s "
                         "this platform can wait")
    return value


def regex(text: str | None, what: str = "--until") -> str | None:
    """A pattern the console can search its (bytes) lines with: it must compile."""
    if text is None:
        return None
    try:
        re.compile(text.encode("utf-8", "surrogateescape"))
    except re.error as e:
        raise InputError(f"{what} {text!r} is not a valid regular expression: {e}") from None
    return text


def cpus(text: str | int) -> int:
    """--cpus N: a whole number of vCPUs, at least 1 (the host's KVM_CAP_MAX_VCPUS is checked
    when the VM is made, pykvm.machine)."""
    if isinstance(text, bool):
        raise InputError(f"--cpus {text!r} is not a whole number of vCPUs")
    try:
        n = text if isinstance(text, int) else int(str(text).strip(), 10)
    except ValueError:
        raise InputError(f"--cpus {text!r} is not a whole number of vCPUs") from None
    if n < 1:
        raise InputError(f"--cpus {n}: a machine needs at least one vCPU")
    return n


def tap_name(name: str) -> str:
    """A tap interface name (or a pattern with %d): 1-15 bytes, no '/', whitespace or ':'."""
    encoded = name.encode("utf-8", "surrogateescape")
    if not encoded:
        raise InputError("--net tap: an empty interface name")
    if len(encoded) >= IFNAMSIZ:
        raise InputError(f"--net tap:{name}: interface names are at most {IFNAMSIZ - 1} bytes")
    if name in (".", "..") or any(c in name for c in "/: \t\n\0"):
        raise InputError(f"--net tap:{name}: not a valid interface name")
    return name


def boot_args(args) -> None:
    """Check every file and value argument of `pykvm boot` (an argparse namespace), in place:
    `args.memory` becomes bytes, `args.timeout` seconds. Raises InputError at the first bad one.
    Files the VMM reads are checked here and read again (with the same checks) when used."""
    args.memory = memory(args.memory)
    input_file(args.kernel, "kernel", MAX_KERNEL)
    if args.initrd is not None:          # not `if args.initrd`: --initrd '' is an error, not none
        rd = input_file(args.initrd, "initrd", MAX_INITRD)
        if rd.stat().st_size >= args.memory:
            raise InputError(f"initrd {args.initrd} ({rd.stat().st_size >> 20} MiB) does not fit "
                             f"in {args.memory >> 20} MiB of guest memory (--memory)")
    if args.disk is not None:
        disk_image(args.disk, writable=not (args.readonly or args.snapshot))
    args.timeout = timeout(args.timeout)
    if hasattr(args, "cpus"):
        args.cpus = cpus(args.cpus)
    regex(args.until)
    if args.net:
        kind, colon, name = args.net.partition(":")
        if kind == "tap" and name:
            tap_name(name)
    if args.console not in ("stdio", "none"):
        output_file(args.console, "--console")
    if args.trace is not None:
        output_file(args.trace, "--trace", dash_ok=True)
    if args.profile is not None and args.profile != "-":
        input_file(args.profile, "--profile System.map", MAX_SYSTEM_MAP)
    _save_args(args)


def _save_args(args) -> None:
    """--save-at REGEX and --save-to FILE (pykvm/snapshot/cli.py), where the command has them."""
    regex(getattr(args, "save_at", None), "--save-at")
    if getattr(args, "save_to", None):
        output_file(args.save_to, "--save-to")
        # A snapshot is written beside the target and renamed over it (pykvm/snapshot/format.py):
        # over /dev/null that would put a 256 MiB file where the device node was.
        kind = _kind(os.stat(args.save_to).st_mode) if os.path.exists(args.save_to) else None
        if kind is not None:
            raise InputError(f"--save-to {args.save_to} is {kind}: a snapshot replaces the file "
                             "it is saved to; give a regular file's name")


def restore_args(args) -> None:
    """`pykvm restore`'s arguments, as boot_args does for boot: the snapshot a regular file (a
    FIFO would block the open), the other values as for boot."""
    input_file(args.snapshot, "snapshot", 2 * MAX_MEMORY)
    args.timeout = timeout(args.timeout)
    regex(args.until)
    if args.console not in ("stdio", "none"):
        output_file(args.console, "--console")
    _save_args(args)


__all__ = ["InputError", "boot_args", "restore_args", "read_input", "input_file", "disk_image", "output_file", "size",
           "memory", "timeout", "regex", "tap_name", "host_memory", "cpus"]
