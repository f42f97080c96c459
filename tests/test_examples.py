"""The teaching examples stay runnable and print what their docstrings promise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_kvm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args):
    env = dict(os.environ, PYTHONPATH=str(EXAMPLES.parent))
    p = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    return p


@needs_kvm
@pytest.mark.parametrize("name,expected", [
    ("01_real_mode.py", "the guest says: 5"),
    ("02_protected_mode.py", "Hello from 32-bit protected mode!"),
    ("03_long_mode.py", "20! = 2432902008176640000"),
    ("04_devices_and_exits.py", "12 * 11 = 132"),
    ("05_firmware.py", "modes: all stages passed"),
])
def test_example_output(name, expected):
    assert expected in run_example(name).stdout


@needs_kvm
def test_tracer_shows_each_exit_with_its_device():
    err = run_example("04_devices_and_exits.py").stderr
    assert "out  port 0x0500 size 1 data 0c  -> multiplier+0x0" in err
    assert "in   port 0x0502 size 2  -> multiplier+0x2" in err


@needs_kvm
@pytest.mark.skipif(__import__("shutil").which("gdb") is None, reason="gdb is not installed")
def test_gdb_example_steps_from_real_mode_to_main():
    out = run_example("07_gdb.py").stdout
    assert "rip            0x8000" in out and "rip            0x8002" in out, out
    assert "Breakpoint 1, main ()" in out and "exited normally" in out, out
    assert "the guest printed: 'Hello from pykvm firmware at CPL0'; exit status 0" in out
