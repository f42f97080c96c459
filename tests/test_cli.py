"""The `pykvm` command as a user meets it: exit codes and one-line errors, never a traceback."""

import os
import subprocess
import sys

import pytest

from conftest import needs_kvm


def pykvm(*args, env=None, timeout=120):
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "pykvm.cli", *args], capture_output=True, text=True,
                       env=e, timeout=timeout, stdin=subprocess.DEVNULL)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def one_line_error(p) -> str:
    lines = [l for l in p.stderr.splitlines() if l.startswith("pykvm: error:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


@needs_kvm
def test_info_reports_the_host():
    from pykvm import pvm
    p = pykvm("info")
    assert p.returncode == 0, p.stderr
    assert "API version:      12" in p.stdout
    assert f"host kind:        {pvm.host_kind()}" in p.stdout
    assert "irqchip" in p.stdout


@pytest.mark.skipif(not os.path.exists("/sys/module/kvm_pvm"), reason="this host is not KVM-PVM")
def test_info_says_kvm_pvm_here():
    p = pykvm("info")
    assert "host kind:        KVM-PVM" in p.stdout and "emulated" in p.stdout


def test_missing_dev_kvm(tmp_path):
    p = pykvm("info", env={"PYKVM_KVM_DEVICE": str(tmp_path / "nope")})
    assert p.returncode == 2
    assert "does not exist" in one_line_error(p)


@needs_kvm
def test_an_empty_kvm_device_variable_means_the_default():
    """PYKVM_KVM_DEVICE= (set, empty: a CI's unset variable) is /dev/kvm, as if not set; it was
    the path '' ("pykvm: error:  does not exist")."""
    p = pykvm("info", env={"PYKVM_KVM_DEVICE": ""})
    assert p.returncode == 0, p.stderr
    assert "KVM device:       /dev/kvm" in p.stdout


def test_unreadable_dev_kvm(tmp_path):
    node = tmp_path / "kvm"
    node.write_text("")
    node.chmod(0)
    if os.access(node, os.R_OK):   # root reads anything: then it is "not a KVM device"
        expected = "not a KVM device"
    else:
        expected = "not accessible"
    p = pykvm("info", env={"PYKVM_KVM_DEVICE": str(node)})
    assert p.returncode == 2 and expected in one_line_error(p)


def test_missing_kernel(tmp_path):
    p = pykvm("boot", str(tmp_path / "bzImage"), "--console", "none")
    assert p.returncode == 2 and "does not exist" in one_line_error(p)


@needs_kvm
def test_not_a_bzimage(tmp_path):
    k = tmp_path / "kernel"
    k.write_bytes(os.urandom(8192))
    p = pykvm("boot", str(k), "--console", "none")
    assert p.returncode == 2
    one_line_error(p)


@needs_kvm
@pytest.mark.parametrize("size", ["1M", "12K", "lots"])
def test_too_little_or_bad_memory(tmp_path, size):
    k = tmp_path / "kernel"
    k.write_bytes(b"\0" * 4096)
    p = pykvm("boot", str(k), "--memory", size, "--console", "none")
    assert p.returncode == 2
    assert "memory" in one_line_error(p)


def test_missing_initrd(tmp_path):
    k = tmp_path / "kernel"
    k.write_bytes(b"\0" * 4096)
    p = pykvm("boot", str(k), "--initrd", str(tmp_path / "rd"), "--console", "none")
    assert p.returncode == 2 and "initrd" in one_line_error(p)


@needs_kvm
def test_missing_disk(tmp_path):
    k = tmp_path / "kernel"
    k.write_bytes(b"\0" * 4096)
    p = pykvm("boot", str(k), str(tmp_path / "disk.img"), "--console", "none")
    assert p.returncode == 2 and "disk image" in one_line_error(p)


def test_snapshot_without_disk_is_a_usage_error(tmp_path):
    k = tmp_path / "kernel"
    k.write_bytes(b"\0" * 4096)
    p = pykvm("boot", str(k), "--snapshot", "--console", "none")
    assert p.returncode == 2 and "--snapshot" in one_line_error(p)


def test_console_to_a_closed_pipe_is_dropped_not_fatal():
    """`pykvm boot ... | head`: once stdout is gone, guest output is dropped and the VM goes on."""
    from pykvm.cli_run import terminal_sink

    class ClosedPipe:
        writes = 0

        def write(self, data):
            ClosedPipe.writes += 1
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    sink = terminal_sink(ClosedPipe(), raw=False)
    sink(b"first line\n")          # must not raise
    sink(b"second line\n")
    assert ClosedPipe.writes == 1  # the sink stopped trying after the first failure


def test_terminal_sink_adds_cr_in_raw_mode():
    import io
    from pykvm.cli_run import terminal_sink
    out = io.BytesIO()
    terminal_sink(out, raw=True)(b"a\nb\n")
    assert out.getvalue() == b"a\r\nb\r\n"


@pytest.mark.parametrize("args,words", [
    (["--debug-exit", "0xf4,3"], "1, 2 or 4"),
    (["--fw-cfg", "etc/x,string=1"], "opt/"),
    (["--fw-cfg", "opt/x,file=/nonexistent/f"], "does not exist"),
])
def test_bad_test_device_options_are_one_line_errors(tmp_path, args, words):
    k = tmp_path / "kernel"
    k.write_bytes(b"\0" * 4096)
    p = pykvm("boot", str(k), *args, "--console", "none")
    assert p.returncode == 2 and words in one_line_error(p)


def test_each_subcommand_says_what_it_does_in_its_help():
    """`pykvm CMD --help` has a description under its usage, not just the options."""
    from pykvm.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert parser.description, f"pykvm {name} --help has no description"


def test_restore_help_mentions_no_gdb_it_does_not_have():
    from pykvm.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "gdb" not in sub.choices["restore"].format_help()
    assert "gdb holds it stopped" in sub.choices["boot"].format_help()
