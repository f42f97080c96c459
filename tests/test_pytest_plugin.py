"""The pytest plugin (pykvm/testing/pytest_plugin.py), run the way a user's suite runs it: pytest in
a subprocess on a small test file, the plugin loaded through its pytest11 entry point."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import kvm_unusable_reason

SUITE = textwrap.dedent('''
    def test_first_clone_runs_on(pykvm_vm):
        pykvm_vm.start(timeout=600)
        pykvm_vm.console.expect(r"Command line:", timeout=600)
        pykvm_vm.console.write(b"MARK-FROM-THE-FIRST-TEST\\n")

    def test_second_clone_starts_from_the_snapshot_again(pykvm_vm):
        assert b"MARK-FROM-THE-FIRST-TEST" not in pykvm_vm.console.data
        pykvm_vm.start(timeout=600)
        pykvm_vm.console.expect(r"Command line:", timeout=600)

    def test_that_fails(pykvm_vm):
        pykvm_vm.start(timeout=600)
        pykvm_vm.console.expect(r"Command line:", timeout=600)
        assert False, "on purpose"
''')


def _pytest(tmp_path, *args):
    (tmp_path / "test_suite.py").write_text(SUITE)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
                           str(tmp_path / "test_suite.py"), *args],
                          capture_output=True, text=True, timeout=1800, cwd=tmp_path)


def test_the_entry_point_loads_the_plugin(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert "--pykvm-kernel" in r.stdout and "--pykvm-save-at" in r.stdout


def test_without_a_kernel_the_fixtures_skip_and_say_why(tmp_path):
    r = _pytest(tmp_path)
    assert r.returncode == 0, r.stdout
    assert "3 skipped" in r.stdout and "no kernel for the pykvm fixtures" in r.stdout


def test_a_kernel_that_cannot_boot_is_one_line_per_test(tmp_path):
    """--pykvm-kernel naming a missing file: each test errors with the reason in one line, no
    traceback into pykvm (nothing boots)."""
    if kvm_unusable_reason():
        pytest.skip(kvm_unusable_reason())
    r = _pytest(tmp_path, f"--pykvm-kernel={tmp_path / 'missing'}")
    assert "3 errors" in r.stdout, r.stdout[-3000:]
    assert f"pykvm: cannot boot the session's kernel: kernel {tmp_path / 'missing'} does not " \
           "exist" in r.stdout
    assert "cli_checks.py" not in r.stdout and "During handling" not in r.stdout


def _kernel_args() -> tuple[str, str]:
    """--pykvm-kernel= and --pykvm-initrd= for the cached test kernel; skips where there is no
    usable /dev/kvm or no built kernel."""
    if kvm_unusable_reason():
        pytest.skip(kvm_unusable_reason())
    from pykvm.assets import initramfs, test_kernel
    from pykvm.assets.errors import AssetError
    try:
        kernel = test_kernel(build=False)
    except AssetError as e:
        pytest.skip(str(e))
    return f"--pykvm-kernel={kernel.bzimage}", f"--pykvm-initrd={initramfs()}"


@pytest.mark.linux
@pytest.mark.kvm
def test_boot_once_restore_per_test_console_in_the_failure_report(tmp_path):
    kernel, initrd = _kernel_args()
    # Saved at the kernel's first line, so the session boot and the tests stay short.
    r = _pytest(tmp_path, kernel, initrd, "--pykvm-memory=64M", "--pykvm-save-at=Linux version")
    out = r.stdout
    assert "1 failed, 2 passed" in out, out[-3000:]
    assert "pykvm console" in out and "on purpose" in out
    # The failing test's report carries what its guest printed after the restore.
    report = out[out.index("test_that_fails"):]
    assert "Command line:" in report


@pytest.mark.linux
@pytest.mark.kvm
def test_the_readmes_example_passes_as_the_readme_says_to_run_it(tmp_path):
    """README.md's plugin example, with the --pykvm-save-at the README gives for it: a clone's
    console starts at the save point, so a default save at "Run /init" would never show it."""
    import re
    from pathlib import Path
    kernel, initrd = _kernel_args()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### The pytest plugin"):]
    section = section[:section.index("\n## ")]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    save_at = re.search(r"`--pykvm-save-at='([^']+)'`", section).group(1)
    (tmp_path / "test_readme.py").write_text(example)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                        kernel, initrd, "--pykvm-memory=64M", f"--pykvm-save-at={save_at}",
                        "test_readme.py"],
                       capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert "1 passed" in r.stdout, r.stdout[-3000:]
