"""The pytest plugin of the inner pytest (in L1): every test report as a JSON line for the host.

Loaded with ``-p pykvm.lane.inner`` by :mod:`.pytest_plugin`; writes to the file named by
``$PYKVM_LANE_RESULTS`` (in the run's writable share). One line per report (setup, call,
teardown of each test), flushed at once, so the host knows what finished even if L1 dies later.
"""

from __future__ import annotations

import json
import os

RESULTS_ENV = "PYKVM_LANE_RESULTS"


def report_record(report) -> dict:
    """A TestReport as plain data: what the host needs to report the same outcome."""
    record = {
        "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
        "duration": report.duration, "sections": [list(s) for s in report.sections],
        "longrepr": None, "skip": None, "wasxfail": getattr(report, "wasxfail", None),
        "crash": None,
    }
    if report.skipped and isinstance(report.longrepr, tuple):
        path, lineno, reason = report.longrepr
        record["skip"] = [str(path), lineno, str(reason)]
    elif report.longrepr is not None:
        record["longrepr"] = report.longreprtext
        crash = getattr(report.longrepr, "reprcrash", None)  # the one line --tb=line and -r show
        if crash is not None:
            record["crash"] = [str(crash.path), crash.lineno, crash.message]
    return record


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(report_record(report)) + "\n")
