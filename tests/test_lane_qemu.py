"""The lane itself, under QEMU: what a command sees in L1, and what comes back (any host with QEMU).

Each test is one L1 boot (QEMU TCG), so they are few and marked ``linux`` (slow) like the boots.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pykvm.lane.qemu import QEMU

pytestmark = [pytest.mark.linux,
              pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed")]

CHECKOUT = Path(__file__).resolve().parent.parent

# Run in L1's chroot by /bin/sh. Each line prints a fact the test checks.
PROBE = r"""
echo "cwd=$(pwd)"
echo "var=$PYKVM_PROBE_VAR"
test -c /dev/kvm && echo "kvm=char-device"
grep -qw svm /proc/cpuinfo && echo "cpu=svm"
touch probe-file 2>/dev/null && echo "root=writable" || echo "root=read-only"
echo shared > "$TMPDIR/from-l1" && echo "share=writable"
echo "to stderr" >&2
exit 7
"""


def selftest(*args, cwd=CHECKOUT, extra_env=None):
    env = {**os.environ, "PYKVM_PROBE_VAR": "a b $c", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "pykvm.cli", "selftest", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=900, stdin=subprocess.DEVNULL)


def test_a_command_in_the_lane_sees_amd_v_the_host_tree_and_the_share():
    p = selftest("--keep", "--", "sh", "-c", PROBE)
    assert p.returncode == 7, p.stderr  # the command's own status
    facts = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    assert facts["cwd"] == str(CHECKOUT)
    assert facts["var"] == "a b $c"
    assert facts["kvm"] == "char-device" and facts["cpu"] == "svm"
    assert facts["root"] == "read-only"
    assert facts["share"] == "writable"
    assert "to stderr" in p.stdout  # the job's stderr shares its stdout (COM2)
    kept = [line.rsplit("run directory kept: ", 1)[1].split(" (")[0] for line in p.stderr.splitlines()
            if "run directory kept: " in line]
    assert kept, p.stderr
    run_dir = Path(kept[0])
    try:
        assert (run_dir / "tmp" / "from-l1").read_text() == "shared\n"
        assert (run_dir / "status").read_text().strip() == "7"
        assert "pykvm-lane: kvm_amd loaded" in (run_dir / "l1-console.log").read_text()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not (CHECKOUT / "probe-file").exists()


def test_the_lane_timeout_gives_status_124_and_the_l1_console():
    p = selftest("--timeout", "3", "--", "sleep", "600")
    assert p.returncode == 124, p.stderr
    assert "pykvm: error: the lane timed out after 3 s" in p.stderr
    assert "L1 console, last" in p.stderr
    kept = [line.rsplit("run directory kept: ", 1)[1].split(" (")[0] for line in p.stderr.splitlines()
            if "run directory kept: " in line]
    for d in kept:
        shutil.rmtree(d, ignore_errors=True)
