"""Run one command in the lane: a run directory, a job script, QEMU, and what came back.

A run directory (``pykvm-lane-XXXX`` under the host's temporary directory) is the writable
share. The host writes ``job.sh`` there (cd, environment, exec the command); L1's /init runs it
in a chroot of the host's / and writes ``status``; QEMU's two serial ports become
``l1-console.log`` (L1's kernel and /init) and ``output.log`` (the job's stdout and stderr, also
streamed to the caller while it runs). QEMU's own messages go to ``qemu.log``.

One lane runs at a time per cache (``flock`` on ``lane.lock`` in the asset cache, or
``$PYKVM_LANE_LOCK``): TCG keeps a host core busy, and two of them on a small machine only make
both slow.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..assets.cache import cache_root
from ..assets.progress import Progress
from .qemu import LaneError, command_line, qemu_binary

# How a run can end without the job's status:
LANE_FAILED = 125  # QEMU or L1 failed before or while running the job (as env(1)/chroot(1): 125)
LANE_TIMEOUT = 124  # the timeout passed (as timeout(1))
INNER_ENV = "PYKVM_LANE_INNER"  # set to 1 in the job's environment
_STATUS_LINE = re.compile(r"pykvm-lane: exit status (\d+)")
_HARMLESS = ("TCG doesn't support requested feature",)
# L1 console lines left out of failure reports (l1-console.log keeps them). MSR 0xc0010007 is
# MSR_K7_PERFCTR3, one of AMD's legacy performance counters; L1's KVM runs without PMU
# virtualization ("SVM: PMU virtualization is disabled" in L1's log) and logs the write that every
# L2 Linux boot makes to it. Harmless: the L2 boots go on.
_NOISE = ("Unhandled WRMSR(0xc0010007)",)
# What L1's /init mounts fresh over the host's tree (l1-init.sh): the host's own files there are
# not visible through the read-only root share. A checkout or asset cache under /tmp or /run (a CI
# clone in /tmp, say) is exported to L1 as a share of its own and mounted back at its path
# (:func:`exported_paths`); nothing under /proc, /sys or /dev can be.
HIDDEN = ("/proc", "/sys", "/dev", "/run", "/tmp")
EXPORTABLE = ("/run", "/tmp")
# L1's own /tmp, a tmpfs (l1-init.sh). A job's $TMPDIR is the share (job_environment), whose 9p
# files do not all behave as local ones: ftruncate of an open but unlinked file fails with ENOENT
# there (measured 2026-12-03; pykvm/host/overlay.py works around it). pytest's output capture is
# such a file, so the inner pytest keeps its temporary files here instead (pytest_plugin.py).
L1_TMP = "/tmp"


@dataclass
class LaneResult:
    """What one lane run gave back."""

    status: int  # the job's exit status, or LANE_FAILED / LANE_TIMEOUT
    error: str | None  # one line when the lane itself failed or timed out, else None
    output: str  # the job's stdout and stderr (COM2)
    console: str  # L1's console (COM1): kernel messages and /init's "pykvm-lane:" lines
    run_dir: Path

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 0

    def console_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of L1's console, without its known noise."""
        kept = [line for line in self.console.splitlines() if not any(n in line for n in _NOISE)]
        return "\n".join(kept[-lines:])


def lock_path() -> Path:
    env = os.environ.get("PYKVM_LANE_LOCK")
    return Path(env) if env else cache_root() / "lane.lock"


def job_script(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    """The shell script L1 runs in the chroot: exactly ``argv`` in ``cwd`` with ``env``."""
    if not argv:
        raise ValueError("no command to run")
    lines = ["#!/bin/sh", "# written by pykvm.lane for one run",
             f"cd {shlex.quote(str(cwd))} || exit 126",
             "exec env -i \\"]
    lines += [f"    {shlex.quote(f'{k}={v}')} \\" for k, v in sorted(env.items())]
    lines.append("    " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


def job_environment(base: Mapping[str, str], run_dir: Path) -> dict[str, str]:
    """The caller's environment as the job sees it: temporary files in the share, no bytecode writes
    (the host's tree is read-only there), and a note that it runs in the lane."""
    env = {k: v for k, v in base.items() if not k.startswith("PYTEST_") and "\n" not in v}
    env.update(TMPDIR=str(run_dir / "tmp"), PYTHONDONTWRITEBYTECODE="1", **{INNER_ENV: "1"})
    return env


def _under(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def exported_paths(cwd: Path, run_dir: Path | None = None, extra: Sequence[Path] = ()) -> list[Path]:
    """The directories the job needs that L1's fresh /tmp or /run would hide: ``cwd`` and ``extra``
    (the asset cache), outside the share. Each becomes a read-only share mounted at its own path.
    Raises :class:`LaneError` for a directory under /proc, /sys or /dev, which L1 cannot show."""
    out: list[Path] = []
    for path in (cwd, *extra):
        if run_dir is not None and _under(path, run_dir):
            continue
        hidden = next((Path(h) for h in HIDDEN if _under(path, Path(h))), None)
        if hidden is None:
            continue
        if str(hidden) not in EXPORTABLE:
            raise LaneError(f"cannot run in {path}: the lane mounts a fresh {hidden} over the host's, "
                            "so start from a directory outside /proc, /sys and /dev")
        if path == hidden:
            raise LaneError(f"cannot run in {path}: the lane mounts a fresh {hidden} over the host's, "
                            f"so start from a directory below it or outside it")
        if not any(_under(path, seen) for seen in out):
            out = [seen for seen in out if not _under(seen, path)] + [path]
    return out


def check_cwd(cwd: Path, run_dir: Path | None = None) -> None:
    """Refuse, in one line, a working directory the lane cannot show L1 (see :func:`exported_paths`)."""
    exported_paths(cwd, run_dir)


def new_run_dir() -> Path:
    """A fresh run directory (the writable share), readable by the QEMU process."""
    path = Path(tempfile.mkdtemp(prefix="pykvm-lane-"))
    path.chmod(0o755)
    return path


def run(argv: Sequence[str], *, cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
        timeout: float = 600, run_dir: Path | None = None,
        output: Callable[[bytes], None] | None = None, progress: Progress | None = None) -> LaneResult:
    """Run ``argv`` in the lane and return its :class:`LaneResult`.

    The assets are fetched or built first (on this host: the cache is read-only in L1).
    ``output`` gets the job's output as it arrives. ``run_dir`` is created if not given; the caller
    removes it (:func:`cleanup`) once it has what it needs. Raises ``LaneUnavailable`` when QEMU is
    missing, ``LaneError`` for a ``cwd`` L1 cannot see, ``AssetError`` when an asset cannot be had.
    """
    from ..assets.l1 import l1_initramfs, l1_kernel

    progress = progress or Progress("lane")
    qemu = qemu_binary()
    cwd = Path(cwd or os.getcwd()).resolve()
    exports = exported_paths(cwd, run_dir.resolve() if run_dir is not None else None,
                             [cache_root().resolve()])
    kernel = l1_kernel(progress=progress)
    initrd = l1_initramfs(kernel, progress=progress)
    run_dir = run_dir or new_run_dir()
    (run_dir / "tmp").mkdir(exist_ok=True)
    (run_dir / "job.sh").write_text(job_script(argv, cwd, job_environment(env or os.environ, run_dir)))
    for stale in ("status", "output.log", "l1-console.log", "qemu.log"):
        (run_dir / stale).unlink(missing_ok=True)
    console_log = run_dir / "l1-console.log"
    cmd = command_line(qemu, kernel.vmlinuz, initrd, run_dir, console_log, exports=exports)

    lock_file = lock_path()
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.say(f"waiting for another lane run to finish (lock {lock_file})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        progress.say(f"starting L1 ({kernel.release} on QEMU TCG, -cpu {cmd[cmd.index('-cpu') + 1]}); "
                     f"run directory {run_dir}")
        timed_out = _run_qemu(cmd, run_dir, timeout, output)
    return _result(run_dir, timed_out, timeout)


# <linux/prctl.h>. Copied, against pykvm's habit of taking constants from headers through the
# compiled binding: prctl numbers are fixed syscall ABI, and the lane (which only runs QEMU) should
# not need the KVM binding built.
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when our process dies (prctl(2) PR_SET_PDEATHSIG), so a
    killed test run leaves no QEMU behind to burn a core after it has let go of the lock."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _run_qemu(cmd: list[str], run_dir: Path, timeout: float, output: Callable[[bytes], None] | None) -> bool:
    """Run QEMU to its end or the timeout; stream COM2 into output.log (and ``output``). True on timeout."""
    with open(run_dir / "output.log", "wb") as out, open(run_dir / "qemu.log", "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                preexec_fn=_die_with_parent)

        def pump() -> None:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                out.write(chunk)
                out.flush()
                if output is not None:
                    output(chunk)

        reader = threading.Thread(target=pump, name="lane-output", daemon=True)
        reader.start()
        try:
            proc.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        except BaseException:  # Ctrl-C: do not leave a QEMU behind
            proc.kill()
            proc.wait()
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(10)
            proc.stdout.close()
    return timed_out


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _result(run_dir: Path, timed_out: bool, timeout: float) -> LaneResult:
    console = _read(run_dir / "l1-console.log")
    output = _read(run_dir / "output.log")
    status: int | None = None
    try:
        status = int(_read(run_dir / "status").strip())
    except ValueError:
        m = _STATUS_LINE.search(console)
        if m:
            status = int(m.group(1))
    if timed_out:
        return LaneResult(LANE_TIMEOUT, f"the lane timed out after {timeout:g} s", output, console, run_dir)
    if status is None or status == LANE_FAILED and "pykvm-lane: error:" in console:
        return LaneResult(LANE_FAILED, _why(console, _read(run_dir / "qemu.log")), output, console, run_dir)
    return LaneResult(status, None, output, console, run_dir)


def _why(console: str, qemu_log: str) -> str:
    """One line on why L1 never reported the job's status."""
    for line in reversed(console.splitlines()):
        if "pykvm-lane: error:" in line:
            return "L1 /init: " + line.split("pykvm-lane: error:", 1)[1].strip()
    if "Kernel panic" in console:
        panic = [line for line in console.splitlines() if "Kernel panic" in line][-1]
        return "L1 kernel panic: " + panic.split("Kernel panic - ", 1)[-1].strip()
    errors = [line.strip() for line in qemu_log.splitlines()
              if line.strip() and not any(h in line for h in _HARMLESS)]
    if errors:
        return f"QEMU: {errors[-1]}"
    if not console.strip():
        return "L1 printed nothing on its console (QEMU could not start it?)"
    return "L1 stopped without reporting the job's exit status (see its console)"


def cleanup(result: LaneResult) -> None:
    shutil.rmtree(result.run_dir, ignore_errors=True)
