"""pytest plugin: boot a kernel once per test session, give every test a fresh restored copy.

Installed with pykvm (the `pytest11` entry point in pyproject.toml), inactive until a kernel is
named. A test asks for `pykvm_vm` (here with `--pykvm-save-at='Freeing unused kernel image'`):

    def test_reaches_init(pykvm_vm):
        pykvm_vm.start()
        pykvm_vm.console.expect("Run /init", timeout=60)

The first test that needs it boots the kernel (`--pykvm-kernel=...`, `--pykvm-initrd=...`,
`--pykvm-memory=...`, `--pykvm-append=...`, or the `pykvm_*` ini options of the same names; with
`=`, since pytest reads a path given as a separate word as one of its own and looks for rootdir
and the ini file around it) until a console line matches `--pykvm-save-at` (default "Run /init as
init process"), saves the VM in the session's temporary directory and stops it. Every test then
gets `LinuxVM.restore(..., clone=True)` of that file: a VM at exactly that point, not started
(call `start()` or `run()`), closed after the test; its console holds only what the guest prints
from there on (with the default, the example above would wait in vain: init has started).
Restoring maps the saved RAM copy-on-write, so a test costs a fraction of a second instead of a
boot, and tests cannot see each other's changes.

Fixtures: `pykvm_snapshot` (session: the snapshot's path), `pykvm_vm` (a restored LinuxVM).
When a test that used `pykvm_vm` fails, its report gets a "pykvm console" section with what the
guest printed. Without a kernel option, or without a usable /dev/kvm, the fixtures skip the test
and say why.
"""

from __future__ import annotations

import os

import pytest

DEFAULT_SAVE_AT = r"Run /init as init process"
DEFAULT_MEMORY = "128M"
BOOT_TIMEOUT = 900.0

_OPTIONS = (
    ("kernel", None, "bzImage or vmlinux to boot once per session (enables the pykvm fixtures)"),
    ("initrd", None, "initramfs for that kernel"),
    ("memory", DEFAULT_MEMORY, f"guest RAM (default {DEFAULT_MEMORY})"),
    ("append", "", "extra kernel command line arguments"),
    ("save-at", DEFAULT_SAVE_AT, "console regex at which the booted VM is saved "
                                 f"(default {DEFAULT_SAVE_AT!r})"),
)


def pytest_addoption(parser) -> None:
    group = parser.getgroup("pykvm", "pykvm: boot once, restore a VM per test")
    for name, default, help_ in _OPTIONS:
        group.addoption(f"--pykvm-{name}", default=None, help=help_)
        parser.addini(f"pykvm_{name.replace('-', '_')}", help_, default=default)


def _option(config, name: str):
    value = config.getoption(f"--pykvm-{name}")
    if value is None:
        value = config.getini(f"pykvm_{name.replace('-', '_')}")
    return value or None


@pytest.fixture(scope="session")
def pykvm_snapshot(request, tmp_path_factory) -> str:
    """Path of the session's snapshot: the configured kernel booted to `--pykvm-save-at`."""
    from pykvm.boot import BootError
    from pykvm.linux import LinuxVM
    from pykvm.machine import MachineError
    from pykvm.stop import StopReason

    config = request.config
    kernel = _option(config, "kernel")
    if kernel is None:
        pytest.skip("no kernel for the pykvm fixtures: give --pykvm-kernel (or ini pykvm_kernel)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is missing or not usable by this user")
    save_at = _option(config, "save-at") or DEFAULT_SAVE_AT
    path = tmp_path_factory.mktemp("pykvm") / "session.snap"
    try:
        vm = LinuxVM(kernel, initrd=_option(config, "initrd"),
                     append=_option(config, "append") or "",
                     memory=_option(config, "memory") or DEFAULT_MEMORY, until=save_at)
    except (MachineError, BootError) as e:      # a missing kernel, too little memory, ...: one line
        vm, why = None, str(e)
    if vm is None:                              # (outside the except: no chained traceback)
        pytest.fail(f"pykvm: cannot boot the session's kernel: {why}", pytrace=False)
    with vm:
        stop = vm.run(BOOT_TIMEOUT)
        if stop.reason is not StopReason.UNTIL:
            pytest.fail(f"pykvm: the session boot stopped ({stop.reason}: {stop.message}) before "
                        f"the console matched {save_at!r}; last lines:\n{vm.console.tail()}",
                        pytrace=False)
        vm.save(path)
    return str(path)


@pytest.fixture
def pykvm_vm(request, pykvm_snapshot):
    """A LinuxVM restored from the session's snapshot (a clone), not yet started."""
    from pykvm.linux import LinuxVM
    vm = LinuxVM.restore(pykvm_snapshot, clone=True)
    request.node._pykvm_console = vm.console
    try:
        yield vm
    finally:
        vm.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    console = getattr(item, "_pykvm_console", None)
    if console is not None and report.failed:
        text = console.text
        report.sections.append(("pykvm console", text if text else "(the guest printed nothing)"))
