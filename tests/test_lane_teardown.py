"""An amdv item reported from the lane still ends its module: the lane plugin reports the item
itself (pytest_runtest_protocol returns True), so pytest's own protocol never runs the item's
teardown stage, and the plugin calls ``item.session._setupstate.teardown_exact(nextitem)`` in its
place. That is pytest's private API (present in pytest 8 and 9): this test pins it.

Without that call, a module whose LAST item is an amdv one stays set up, and the next module's
first test errors with "previous item was not torn down properly" (seen in session 6's fresh-clone
suite: test_rtc.py after test_raw_kvm_debug.py).

The lane never starts: the host session runs in-process under ``pytester``, with the lane's
``run`` replaced by one that writes what the inner pytest would have reported for each item it was
given (setup, call and teardown passed, as pykvm.lane.inner records them) - the same records a
real lane run leaves in the share.
"""

from __future__ import annotations

import json
import os

import pykvm.lane.pytest_plugin as lane_plugin
from pykvm.lane.inner import RESULTS_ENV
from pykvm.lane.runner import LaneResult

pytest_plugins = ["pytester"]

# A module with a module-scoped fixture and a test on the host that sets it up. Module A adds an
# amdv item LAST, so it goes to the lane after the host item; module B follows.
MODULE = '''
import pytest

@pytest.fixture(scope="module")
def resource(events):
    events("{name} up")
    yield
    events("{name} down")

def test_{name}_on_the_host(resource):
    pass
'''

LANE_ITEM = '''
@pytest.mark.amdv
def test_a_in_the_lane():
    pass
'''

CONFTEST = '''
import pytest

@pytest.fixture(scope="session")
def events(request):
    path = request.config.rootpath / "events.log"
    def log(text):
        with open(path, "a") as f:
            f.write(text + "\\n")
    return log

def pytest_configure(config):
    config.pluginmanager.import_plugin("pykvm.lane.pytest_plugin")
'''


def _passed_records(nodeid: str) -> list[dict]:
    """What pykvm.lane.inner writes for a test that passed: one record per stage."""
    return [{"nodeid": nodeid, "when": when, "outcome": "passed", "duration": 0.0, "sections": [],
             "longrepr": None, "skip": None, "wasxfail": None, "crash": None}
            for when in ("setup", "call", "teardown")]


def _fake_run(argv, *, cwd, env, timeout, run_dir, output=None):
    nodeids = [a for a in argv if "::" in a]
    with open(env[RESULTS_ENV], "w") as f:
        for nodeid in nodeids:
            for record in _passed_records(nodeid):
                f.write(json.dumps(record) + "\n")
    return LaneResult(0, None, "", "fake L1 console\n", run_dir)


def test_a_module_ending_in_a_lane_item_is_torn_down_before_the_next(pytester, monkeypatch):
    monkeypatch.setattr(lane_plugin, "where_to_run", lambda: (lane_plugin.LANE, ""))
    monkeypatch.setattr(lane_plugin, "_prepare_assets", lambda: None)
    monkeypatch.setattr(lane_plugin, "run", _fake_run)
    monkeypatch.setenv("TMPDIR", str(pytester.path))  # the fake run's directory (new_run_dir)
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    amdv: lane\n")
    pytester.makepyfile(test_a=MODULE.format(name="a") + LANE_ITEM, test_b=MODULE.format(name="b"))

    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "test_a.py", "test_b.py")

    out = result.stdout.str()
    assert "not torn down properly" not in out, out
    result.assert_outcomes(passed=3)
    # module A's fixture ends before module B's begins, as it would with no lane in between
    events = (pytester.path / "events.log").read_text().split("\n")[:-1]
    assert events == ["a up", "a down", "b up", "b down"], events
    assert not [p for p in os.listdir(pytester.path) if p.startswith("pykvm-lane-")]  # cleaned up
