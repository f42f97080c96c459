"""The ``amdv`` pytest marker: tests that need real hardware virtualization (guest userland).

Where a marked test runs:

* on a VT-x/AMD-V host with a usable /dev/kvm (including L1 inside the lane): directly;
* elsewhere (a KVM-PVM cloud machine, or no /dev/kvm) with QEMU installed: in the AMD-V lane.
  At the first marked test, the host builds the default assets, boots the lane *once* and runs an
  inner ``pytest`` there on the node ids of all selected marked tests (the checkout and its venv
  are at the same paths in L1); each host-side test then reports its inner outcome: the inner
  failure text with the L1 console's tail, or the inner skip reason. So ``-k``/``-m`` select as
  usual, and the lane's outcome shows up test by test;
* elsewhere without QEMU, or with ``PYKVM_LANE=0``: skipped, naming the host and what is missing.

``PYKVM_LANE_TIMEOUT`` (seconds, default 1800) bounds the whole lane run. A failed run's
directory (the share: inner tmp_path files, output.log, l1-console.log) is kept and named in the
reports; a run where everything passed or skipped is removed.

Use it in a suite: ``pytest -p pykvm.lane.pytest_plugin``, or ``import_plugin`` it from a conftest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
from _pytest.reports import TestReport

from .. import pvm
from .inner import RESULTS_ENV
from .qemu import DEBIAN_PACKAGE, QEMU, LaneUnavailable, qemu_binary
from .runner import INNER_ENV, L1_TMP, LaneResult, cleanup, new_run_dir, run

MARK = "amdv"
MARKER_HELP = (f"{MARK}: needs real hardware virtualization (guest userland): runs directly on "
               "VT-x/AMD-V hosts, in the AMD-V lane (QEMU TCG) elsewhere")
DEFAULT_TIMEOUT = 1800
CONSOLE_TAIL = 40
DIRECT, LANE, SKIP = "direct", "lane", "skip"


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def where_to_run(kind: str | None = None, *, kvm_usable: bool | None = None, inner: bool | None = None,
                 qemu: bool | None = None, switch: str | None = None) -> tuple[str, str]:
    """``(DIRECT | LANE | SKIP, reason)`` for marked tests on this host (parameters for tests)."""
    kind = pvm.host_kind() if kind is None else kind
    kvm_usable = _kvm_usable() if kvm_usable is None else kvm_usable
    inner = bool(os.environ.get(INNER_ENV)) if inner is None else inner
    switch = os.environ.get("PYKVM_LANE", "") if switch is None else switch
    if kind in (pvm.INTEL_VTX, pvm.AMD_V) and kvm_usable:
        return DIRECT, ""
    what = f"this host's /dev/kvm is {kind}" if kind != pvm.UNKNOWN else "this host has no VT-x/AMD-V /dev/kvm"
    if inner:  # never a lane in a lane
        return SKIP, f"needs VT-x/AMD-V: {what}, inside the AMD-V lane"
    if switch.lower() in ("0", "off", "no", "false"):
        return SKIP, f"needs VT-x/AMD-V: {what}, and the AMD-V lane is switched off (PYKVM_LANE={switch})"
    if qemu is None:
        try:
            qemu_binary()
            qemu = True
        except LaneUnavailable:
            qemu = False
    if not qemu:
        return SKIP, (f"needs VT-x/AMD-V: {what}, and {QEMU} for the AMD-V lane is not installed "
                      f"(apt-get install {DEBIAN_PACKAGE})")
    return LANE, ""


def lane_timeout(text: str | None) -> float:
    """PYKVM_LANE_TIMEOUT in seconds (unset or empty: DEFAULT_TIMEOUT); anything but a positive,
    finite number is a ValueError, which fails each marked test with its one line."""
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"PYKVM_LANE_TIMEOUT={text!r} is not a positive, finite number of seconds")
    return value


def _prepare_assets() -> None:
    """The default assets, on the host: the cache is read-only in L1 (the same as ``./run test``)."""
    from ..assets import cloud_kernel, disk_image, initramfs, test_kernel
    from ..assets.l1 import l1_initramfs
    test_kernel()
    initramfs()
    initramfs(tiny=True)
    disk_image()
    cloud_kernel()
    l1_initramfs()


class InnerFailure:
    """An inner test's failure text as a host report's longrepr, with the crash location and
    message that ``--tb=line`` and the short summary (``-r``) show, as pytest's own tracebacks have."""

    class _Crash:  # what pytest's ReprFileLocation offers
        def __init__(self, path: str, lineno: int, message: str) -> None:
            self.path, self.lineno, self.message = path, lineno, message

        def __str__(self) -> str:
            return f"{self.path}:{self.lineno}: {self.message}"

    def __init__(self, text: str, crash: list | None, where: tuple[str, int]) -> None:
        self.text = text
        path, lineno, message = crash or (*where, (text.strip().splitlines() or [""])[0])
        self.reprcrash = self._Crash(path, lineno, message)

    def toterminal(self, tw) -> None:
        for line in self.text.splitlines():
            tw.line(line)

    def __str__(self) -> str:
        return self.text


class LanePlugin:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.mode, self.reason = where_to_run()
        self.reports: dict[str, list[dict]] | None = None
        self.result: LaneResult | None = None
        self.error: str | None = None

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        if self.mode == SKIP:
            for item in items:
                if item.get_closest_marker(MARK):
                    item.add_marker(pytest.mark.skip(reason=self.reason))

    def pytest_report_header(self) -> str:
        where = {DIRECT: "directly on this host", LANE: "in the AMD-V lane (QEMU TCG)",
                 SKIP: f"nowhere ({self.reason})"}[self.mode]
        return f"{MARK} tests run {where}"

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem) -> bool | None:
        if self.mode != LANE or item.get_closest_marker(MARK) is None:
            return None
        if self.reports is None:
            self._run_lane(item.session)
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in self._reports_for(item):
            item.ihook.pytest_runtest_logreport(report=report)
        # This item never set anything up here, but the items before it in its module did: tear
        # down what `nextitem` does not need, as pytest's own protocol would at this item's
        # teardown. Otherwise a lane item last in a mixed module leaves that module set up and
        # the next module's first test errors ("previous item was not torn down properly").
        item.session._setupstate.teardown_exact(nextitem)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    # -- the one lane run ---------------------------------------------------------------------

    def _say(self, text: str) -> None:
        capman = self.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            with capman.global_and_fixture_disabled():
                print(f"\npykvm: [lane] {text}", file=sys.stderr, flush=True)
        else:
            print(f"pykvm: [lane] {text}", file=sys.stderr, flush=True)

    def _inner_argv(self, run_dir: Path, nodeids: list[str]) -> list[str]:
        opt = self.config.option
        # TMPDIR on L1's tmpfs: pytest captures a test's output in an unlinked temporary file and
        # truncates it after reading; on the share that truncate fails, and once a test has
        # printed anything, it and every test after it error (runner.L1_TMP). tmp_path stays in
        # the share (--basetemp), kept with a failed run.
        argv = ["env", f"TMPDIR={L1_TMP}",
                sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "pykvm.lane.inner",
                f"--rootdir={self.config.rootpath}", f"--basetemp={run_dir / 'basetemp'}",
                "-v", "-rN"]  # -v: a timed-out run's output names the test it was in
        argv.append("--color=yes" if self.config.get_terminal_writer().hasmarkup else "--color=no")
        if self.config.inipath is not None:
            argv.append(f"--config-file={self.config.inipath}")
        if getattr(opt, "tbstyle", "auto") not in ("auto", None):
            argv.append(f"--tb={opt.tbstyle}")
        return argv + nodeids

    def _run_lane(self, session: pytest.Session) -> None:
        self.reports = {}
        nodeids = [i.nodeid for i in session.items if i.get_closest_marker(MARK)]
        self._say(f"running {len(nodeids)} {MARK} test(s) in the AMD-V lane: building assets, "
                  "then one L1 boot under QEMU TCG")
        verbose = self.config.option.verbose > 0 or self.config.option.capture == "no"
        capman = self.config.pluginmanager.getplugin("capturemanager")

        def stream(chunk: bytes) -> None:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()

        run_dir = None
        try:
            timeout = lane_timeout(os.environ.get("PYKVM_LANE_TIMEOUT"))
            _prepare_assets()
            run_dir = new_run_dir()
            results = run_dir / "results.jsonl"
            # Hypothesis keeps its example database in the checkout, read-only in L1: use the share.
            env = {**os.environ, RESULTS_ENV: str(results),
                   "HYPOTHESIS_STORAGE_DIRECTORY": str(run_dir / "hypothesis")}
            if verbose and capman is not None:
                with capman.global_and_fixture_disabled():
                    self.result = run(self._inner_argv(run_dir, nodeids), cwd=self.config.rootpath,
                                      env=env, timeout=timeout, run_dir=run_dir, output=stream)
            else:
                self.result = run(self._inner_argv(run_dir, nodeids), cwd=self.config.rootpath,
                                  env=env, timeout=timeout, run_dir=run_dir)
        except Exception as e:  # AssetError, LaneError, OSError: every marked test says why
            self.error = f"the AMD-V lane could not start: {e}"
            self._say(self.error)
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
            return
        for line in (results.read_text() if results.exists() else "").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            self.reports.setdefault(record["nodeid"], []).append(record)
        r = self.result
        all_good = r.error is None and r.status in (0, 5) and all(
            rec["outcome"] != "failed" for recs in self.reports.values() for rec in recs) and \
            all(n in self.reports for n in nodeids)
        if all_good:
            cleanup(r)
            self._say(f"lane done: inner pytest exit status {r.status}")
        else:
            self._say(f"lane done: {r.error or f'inner pytest exit status {r.status}'}; "
                      f"run directory kept: {r.run_dir}")

    # -- host-side reports ----------------------------------------------------------------------

    def _reports_for(self, item: pytest.Item) -> list[TestReport]:
        keywords = {k: 1 for k in item.keywords}

        def make(when: str, outcome: str, longrepr, sections=(), duration=0.0) -> TestReport:
            return TestReport(item.nodeid, item.location, keywords, outcome, longrepr, when,
                              sections=list(sections), duration=duration, user_properties=[])

        where = (str(item.path), (item.location[1] or 0) + 1)
        records = (self.reports or {}).get(item.nodeid)
        if self.error is not None or not records:
            text = self._missing_text()
            return [make("setup", "passed", None),
                    make("call", "failed", InnerFailure(text, None, where), self._lane_sections()),
                    make("teardown", "passed", None)]
        out = []
        for rec in records:
            sections = [tuple(s) for s in rec["sections"]]
            if rec["skip"] is not None:
                path, lineno, reason = rec["skip"]
                longrepr = (path, lineno, reason)
            elif rec["longrepr"] is not None:
                longrepr = InnerFailure(rec["longrepr"], rec.get("crash"), where)
            else:
                longrepr = None
            if rec["outcome"] == "failed":
                sections += self._lane_sections()
            report = make(rec["when"], rec["outcome"], longrepr, sections, rec["duration"])
            if rec.get("wasxfail") is not None:
                report.wasxfail = rec["wasxfail"]
            out.append(report)
        return out

    def _lane_sections(self) -> list[tuple[str, str]]:
        r = self.result
        if r is None:
            return []
        return [(f"AMD-V lane: L1 console, last {CONSOLE_TAIL} lines ({r.run_dir}/l1-console.log)",
                 r.console_tail(CONSOLE_TAIL))]

    def _missing_text(self) -> str:
        if self.error is not None:
            return self.error
        r = self.result
        assert r is not None
        why = r.error or f"the inner pytest (exit status {r.status}) did not report this test"
        tail = "\n".join(r.output.splitlines()[-CONSOLE_TAIL:])
        if not tail.strip():
            return f"AMD-V lane: {why}; the inner pytest printed nothing"
        return f"AMD-V lane: {why}\n\ninner output, last {CONSOLE_TAIL} lines ({r.run_dir}/output.log):\n{tail}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    if not config.pluginmanager.has_plugin("pykvm-lane-session"):
        config.pluginmanager.register(LanePlugin(config), "pykvm-lane-session")
