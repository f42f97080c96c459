"""The amdv marker's host side, end to end without QEMU: the lane's ``run`` is replaced by one that
runs the very same inner pytest command line on this host, so the host session's reports of the
inner outcomes (pass, fail with text and L1 console, skip, xfail, selection, lane failure) are real."""

import subprocess
import sys
import textwrap

CONFTEST = '''
import json, os, subprocess
import pykvm.lane.pytest_plugin as lp
from pykvm.lane.runner import LaneResult

if os.environ.get("PYKVM_LANE_INNER"):
    lp.where_to_run = lambda: (lp.DIRECT, "")
else:
    lp.where_to_run = lambda: (lp.LANE, "")
    lp._prepare_assets = lambda: None

    def fake_run(argv, *, cwd, env, timeout, run_dir, output=None):
        with open(os.path.join(os.path.dirname(__file__), "lane-argv.json"), "w") as f:
            json.dump(argv, f)
        if os.environ.get("FAKE_LANE_DIES"):
            return LaneResult(125, "L1 kernel panic: not syncing: test", "", "l1 line\\nKernel panic", run_dir)
        p = subprocess.run(argv, cwd=cwd, env={**env, "PYKVM_LANE_INNER": "1"}, capture_output=True, text=True)
        return LaneResult(p.returncode, None, p.stdout + p.stderr, "fake L1 console: kvm_amd loaded\\n", run_dir)

    lp.run = fake_run


def pytest_configure(config):
    lp.pytest_configure(config)
'''

TESTS = '''
import pytest

@pytest.mark.amdv
def test_in_lane_passes():
    print("inner stdout")

@pytest.mark.amdv
def test_in_lane_fails():
    assert 6 * 7 == 43, "the inner failure text"

@pytest.mark.amdv
def test_in_lane_skips():
    pytest.skip("inner reason")

@pytest.mark.amdv
@pytest.mark.xfail(reason="known inner bug", strict=True)
def test_in_lane_xfails():
    assert False

def test_on_the_host():
    pass
'''


def run_host_pytest(tmp_path, *args, env_extra=None):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(TESTS))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    amdv: lane\n")
    env = {"PATH": "/usr/bin:/bin", "PYKVM_QUIET": "1", "COLUMNS": "200", "TMPDIR": str(tmp_path),
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)


def test_host_reports_each_inner_outcome(tmp_path):
    p = run_host_pytest(tmp_path)
    out = p.stdout
    assert p.returncode == 1, out
    assert "1 failed, 2 passed, 1 skipped, 1 xfailed" in out, out
    assert "FAILED test_sample.py::test_in_lane_fails" in out
    assert "the inner failure text" in out and "assert (6 * 7) == 43" in out
    # the short summary gives the inner crash's one line, as for a local failure
    assert "FAILED test_sample.py::test_in_lane_fails - AssertionError: the inner failure text" in out
    assert "AMD-V lane: L1 console" in out and "fake L1 console: kvm_amd loaded" in out
    assert "SKIPPED" in out and "inner reason" in out
    assert "XFAIL" in out and "known inner bug" in out
    assert "inner stdout" in out  # the passing test's captured output, shown by -rA


def test_selection_reaches_the_inner_run(tmp_path):
    import json
    p = run_host_pytest(tmp_path, "-k", "passes or on_the_host")
    assert p.returncode == 0, p.stdout
    assert "2 passed, 3 deselected" in p.stdout
    inner_argv = json.loads((tmp_path / "lane-argv.json").read_text())
    assert [a for a in inner_argv if a.startswith("test_sample.py::")] == ["test_sample.py::test_in_lane_passes"]
    # pytest's output capture off the 9p share (pykvm/lane/runner.py, L1_TMP)
    assert inner_argv[:2] == ["env", "TMPDIR=/tmp"]


def test_a_lane_that_dies_fails_every_marked_test_with_the_reason(tmp_path):
    p = run_host_pytest(tmp_path, env_extra={"FAKE_LANE_DIES": "1"})
    assert p.returncode == 1
    assert "4 failed, 1 passed" in p.stdout, p.stdout
    assert p.stdout.count("AMD-V lane: L1 kernel panic: not syncing: test") >= 8  # report + summary
    assert "l1 line" in p.stdout  # the L1 console's tail


def test_a_bad_lane_timeout_fails_every_marked_test_with_one_line(tmp_path):
    p = run_host_pytest(tmp_path, env_extra={"PYKVM_LANE_TIMEOUT": "soon"})
    assert "INTERNALERROR" not in p.stdout, p.stdout[-2000:]
    assert "4 failed, 1 passed" in p.stdout, p.stdout[-2000:]
    assert ("AMD-V lane could not start: PYKVM_LANE_TIMEOUT='soon' is not a positive, finite "
            "number of seconds") in p.stdout
