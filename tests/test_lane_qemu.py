"""The lane itself, under QEMU: what a command sees in L1, and what comes back (any host with QEMU).

Each test is one L1 boot (QEMU TCG), so they are few and marked ``linux`` (slow) like the boots.
"""

import os
import shutil
import subprocess
import sys
import time
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


def selftest(tmp_path, *args, cwd=CHECKOUT):
    # TMPDIR: the run directory goes under the test's own tmp_path.
    env = {**os.environ, "PYKVM_PROBE_VAR": "a b $c", "TMPDIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "pykvm.cli", "selftest", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=900, stdin=subprocess.DEVNULL)


def test_a_command_in_the_lane_sees_amd_v_the_host_tree_and_the_share(tmp_path):
    p = selftest(tmp_path, "--keep", "--", "sh", "-c", PROBE)
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
    assert run_dir.parent == tmp_path
    assert (run_dir / "tmp" / "from-l1").read_text() == "shared\n"
    assert (run_dir / "status").read_text().strip() == "7"
    assert "pykvm-lane: kvm_amd loaded" in (run_dir / "l1-console.log").read_text()
    assert not (CHECKOUT / "probe-file").exists()


def test_the_lane_timeout_gives_status_124_and_the_l1_console(tmp_path):
    p = selftest(tmp_path, "--timeout", "3", "--", "sleep", "600")
    assert p.returncode == 124, p.stderr
    assert "pykvm: error: the lane timed out after 3 s" in p.stderr
    assert "L1 console, last" in p.stderr


def _children(pid):
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _gone(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_a_killed_lane_user_leaves_no_qemu_behind(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "pykvm.cli", "selftest", "--", "sleep", "600"], cwd=CHECKOUT,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    qemu = []
    try:
        deadline = time.monotonic() + 600  # the lane may first wait for another run's lock
        while not qemu and p.poll() is None and time.monotonic() < deadline:
            qemu = [c for c in _children(p.pid) if b"qemu-system" in Path(f"/proc/{c}/cmdline").read_bytes()]
            time.sleep(0.2)
        assert qemu, "QEMU never started"
    finally:
        p.kill()  # SIGKILL: no Python clean-up runs
        p.wait()
    deadline = time.monotonic() + 60
    while not _gone(qemu[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(qemu[0]), "QEMU outlived the process that started it"
