"""tests/c/raw_kvm_debug.c: single steps, breakpoints and XSETBV on this host's KVM with no pykvm in
the way - the baseline the gdb stub's tests and pykvm/lane/tcg.py's probe are read against. Run
directly here (KVM-PVM), and on AMD-V (in the lane here: QEMU 7.2's TCG; directly on VT-x/AMD-V).

Asserted: KVM_GUESTDBG_SINGLESTEP stops after each of the loop's 11 instructions, in real and in
protected mode; and the raw program and pykvm's probe agree on whether a guest's XSETBV reaches
KVM. The breakpoint lines (int3, DR0) are only printed: in the lane neither fires
(QEMU's, see docs/kvm-pvm.md, "Single-step and debug"), on hardware both do.
By hand: gcc -O2 -o /tmp/rkd tests/c/raw_kvm_debug.c && /tmp/rkd (or through `pykvm selftest --`).
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import needs_kvm

SOURCE = Path(__file__).parent / "c" / "raw_kvm_debug.c"
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None,
                               reason="gcc builds tests/c/raw_kvm_debug.c")


def raw_kvm_debug(tmp_path) -> dict[str, list[str]]:
    """Build and run the program; its results as {name: [values]}."""
    exe = tmp_path / "raw_kvm_debug"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(exe), str(SOURCE)], check=True)
    p = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    # The int3 and dr0 lines, for -rP and failures. In the lane this print also checks that a test
    # may write output there (pykvm/lane/runner.py, L1_TMP): before, it broke the inner session.
    print(p.stdout)
    return {name: values for name, *values in (line.split() for line in p.stdout.splitlines())}


def check(results: dict[str, list[str]]) -> None:
    from pykvm.lane.tcg import xsetbv_reaches_kvm
    for name in ("steps-real", "steps-real-blockirq", "steps-protected"):
        assert results[name] == ["11"], (name, results)
    written, seen = results["xcr0"]
    assert (seen == written) is xsetbv_reaches_kvm(), results


@needs_kvm
@needs_gcc
def test_raw_kvm_single_steps_here(tmp_path):
    check(raw_kvm_debug(tmp_path))


@pytest.mark.amdv
@needs_kvm
@needs_gcc
def test_raw_kvm_single_steps_on_amdv(tmp_path):
    check(raw_kvm_debug(tmp_path))
