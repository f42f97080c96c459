"""``pykvm selftest``'s default check, as it runs inside L1: ``python -m pykvm.lane.check KERNEL INITRD``.

1. ``pykvm info`` must say the host (L1) is AMD-V (or VT-x: the check also runs on real hardware);
2. ``pykvm boot`` must take the test kernel to its busybox userland (the marker line is printed by
   /init, from guest user mode: on a KVM-PVM host this is where a boot stops short), whose
   ``poweroff -f`` must then end the run with exit status 0 (through ACPI's PM1a control
   register, pykvm's default machine; with ``--no-acpi`` the kernel halts the vCPU instead);
3. that boot's console must hold no kernel warning, BUG, oops or panic (pykvm.testing.kernellog),
   but for the one QEMU's TCG causes, tolerated only where it is measured (pykvm/lane/tcg.py).

Each step prints what it ran and its verdict; the exit status is 0 when all pass, else 1.
"""

from __future__ import annotations

import subprocess
import sys

from .. import pvm
from ..assets.userland import POWEROFF_ARG, USERLAND_MARKER

BOOT_TIMEOUT = 300


def _run(argv: list[str], timeout: float, *, show: bool) -> subprocess.CompletedProcess[str]:
    """Run one pykvm command; print its output if ``show``, else only on failure (its last lines)."""
    print("$ pykvm " + " ".join(argv[3:]), flush=True)
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        p = subprocess.CompletedProcess(argv, 124, out, f"timed out after {timeout:g} s")
    if show:
        print(p.stdout, end="", flush=True)
    elif p.returncode != 0:
        print("\n".join((p.stdout + p.stderr).splitlines()[-30:]), flush=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m pykvm.lane.check KERNEL INITRD", file=sys.stderr)
        return 2
    kernel, initrd = args
    py = [sys.executable, "-m", "pykvm.cli"]
    failed = 0

    info = _run([*py, "info"], 120, show=True)
    kinds = [line.split(":", 1)[1].strip() for line in info.stdout.splitlines() if line.startswith("host kind:")]
    if info.returncode == 0 and kinds and kinds[0] in (pvm.AMD_V, pvm.INTEL_VTX):
        print(f"selftest: ok: /dev/kvm here is {kinds[0]}", flush=True)
    else:
        failed += 1
        print(f"selftest: FAILED: pykvm info (exit {info.returncode}) reports host kind "
              f"{kinds[0] if kinds else '?'}, not {pvm.AMD_V}: {info.stderr.strip()}", flush=True)

    boot = _run([*py, "boot", kernel, "--initrd", initrd, "--memory", "64M", "--append", POWEROFF_ARG,
                 "--timeout", str(BOOT_TIMEOUT), "--console", "stdio"], BOOT_TIMEOUT + 60, show=False)
    stopped = [line for line in boot.stderr.splitlines() if "stopped:" in line]
    if USERLAND_MARKER not in boot.stdout:
        failed += 1
        print(f"selftest: FAILED: the test kernel did not reach userland ({USERLAND_MARKER!r}); pykvm boot "
              f"exited {boot.returncode}: {(stopped or boot.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
    elif boot.returncode != 0:
        failed += 1
        print(f"selftest: FAILED: userland ran, but its poweroff did not end pykvm boot with status 0 "
              f"(exit {boot.returncode}: {(stopped or ['?'])[-1].strip()})", flush=True)
    else:
        print(f"selftest: ok: the test kernel reached its busybox userland and powered off "
              f"({stopped[-1].split('stopped: ', 1)[-1] if stopped else 'exit 0'})", flush=True)
    if USERLAND_MARKER in boot.stdout:
        failed += _check_warnings(boot.stdout)
    return 1 if failed else 0


def _check_warnings(console: str) -> int:
    """Step 3: print the verdict on the boot's kernel warnings; 1 if it failed."""
    from ..testing.kernellog import kernel_splats
    from .tcg import XSAVE_SPLAT, unexpected_splats, xsetbv_reaches_kvm
    try:
        reaches = xsetbv_reaches_kvm()
    except (OSError, RuntimeError) as e:   # KvmError is an OSError; the probe guest did not halt
        print(f"selftest: FAILED: the XSETBV probe guest (pykvm/lane/tcg.py) failed: {e}", flush=True)
        return 1
    unexpected = unexpected_splats(console, xsetbv_reaches_kvm=reaches)
    if unexpected:
        print(f"selftest: FAILED: the test kernel reported {len(unexpected)} problem(s), the first: "
              f"{unexpected[0].message!r}", flush=True)
        return 1
    known = any(s.message == XSAVE_SPLAT for s in kernel_splats(console))
    print("selftest: ok: the test kernel reported no warnings" +
          (f" but the known {XSAVE_SPLAT!r}: a guest's XSETBV does not reach KVM here "
           "(QEMU's TCG, pykvm/lane/tcg.py)" if known else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
