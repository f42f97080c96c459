"""Bad input to `pykvm boot`: each kind gets one line and exit status 2, never a traceback, a hang
or a changed file. The table in docs/bad-input.md lists what each gets; `test_table_is_true`
checks every row of it against the real command."""

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm import cli, cli_checks
from pykvm.cli_checks import InputError

REPO = Path(__file__).resolve().parents[1]
DOCUMENTED = {0, 1, 2, 3, 4, 130}


@pytest.fixture
def files(tmp_path):
    """A folder of bad (and a few good) inputs, named for what they are."""
    d = tmp_path
    (d / "kernel").write_bytes(os.urandom(8192))        # not a bzImage, but a readable file
    os.mkfifo(d / "fifo")
    (d / "dir").mkdir()
    (d / "empty.img").write_bytes(b"")
    (d / "odd.img").write_bytes(b"\0" * 1000)
    (d / "good.img").write_bytes(b"\0" * 4096)
    ro = d / "ro.img"
    ro.write_bytes(b"\0" * 4096)
    ro.chmod(0o444)
    unreadable = d / "unreadable"
    unreadable.write_bytes(b"x")
    unreadable.chmod(0)
    return d


def _run_main(argv, capsys):
    """main(argv) in this process: (status, stderr). argparse's usage errors exit through
    SystemExit, which is part of the contract (status 2, a usage line)."""
    def hung(signum, frame):
        raise TimeoutError(f"pykvm {' '.join(argv)} hung (a FIFO opened without O_NONBLOCK?)")

    previous = signal.signal(signal.SIGALRM, hung)     # a hang fails the test, not the run
    signal.alarm(60)
    try:
        status = cli.main(argv)
    except SystemExit as e:
        status = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    return status, err


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("pykvm: error:")]


# (arguments after "boot", a phrase the one-line error must contain). {d} is the files folder.
CASES = [
    (["{d}/missing"], "does not exist"),
    (["{d}/dir"], "is a directory"),
    (["{d}/fifo"], "FIFO"),
    (["/dev/zero"], "character device"),
    (["{d}/kernel", "--initrd", "{d}/fifo"], "FIFO"),
    (["{d}/kernel", "--initrd", "/dev/zero"], "character device"),
    (["{d}/kernel", "--memory", "infG"], "memory size"),
    (["{d}/kernel", "--memory", "nanM"], "memory size"),
    (["{d}/kernel", "--memory", "1e30G"], "too large"),
    (["{d}/kernel", "--memory=-5M"], "memory size"),
    (["{d}/kernel", "--memory", "100T"], "too large"),
    (["{d}/kernel", "--memory", "1M"], "too little"),
    (["{d}/kernel", "--memory", "256.3M"], "4 KiB"),
    (["{d}/kernel", "--timeout", "inf"], "--timeout"),
    (["{d}/kernel", "--timeout", "nan"], "--timeout"),
    (["{d}/kernel", "--timeout=-1"], "--timeout"),
    (["{d}/kernel", "--timeout", "1e300"], "--timeout"),
    (["{d}/kernel", "--until", "("], "regular expression"),
    (["{d}/kernel", "--until", "a{2,1}"], "regular expression"),
    (["{d}/kernel", "--console", "{d}/nodir/boot.log"], "does not exist"),
    (["{d}/kernel", "--console", "{d}/dir"], "is a directory"),
    (["{d}/kernel", "--trace", "{d}/nodir/trace"], "does not exist"),
    (["{d}/kernel", "--profile", "{d}/missing.map"], "does not exist"),
    (["{d}/kernel", "--profile", "{d}/fifo"], "FIFO"),
    (["{d}/kernel", "--net", "tap:a-name-far-too-long"], "at most 15 bytes"),
    (["{d}/kernel", "--net", "tap:a/b"], "not a valid interface name"),
    (["{d}/kernel", "--net", "vde"], "only tap"),
    (["{d}/kernel", "{d}/empty.img"], "empty"),
    (["{d}/kernel", "{d}/odd.img"], "whole number of 512-byte sectors"),
    (["{d}/kernel", "{d}/dir"], "is a directory"),
    (["{d}/kernel", "{d}/fifo"], "FIFO"),
    (["{d}/kernel", "/dev/zero"], "character device"),
    (["{d}/kernel", "{d}/missing.img"], "does not exist"),
    (["{d}/kernel", "{d}/ro.img"], "read-only"),
    (["{d}/kernel", "{d}/good.img", "--readonly", "--snapshot"], "exclude each other"),
    (["{d}/kernel", "--snapshot"], "--snapshot"),
]


@pytest.mark.parametrize("argv,phrase", CASES, ids=[" ".join(a).replace("{d}/", "") for a, _ in CASES])
def test_bad_input_one_line_status_2(files, capsys, argv, phrase):
    argv = ["boot", *(a.replace("{d}", str(files)) for a in argv)]
    if "--console" not in argv:
        argv += ["--console", "none"]
    before = _snapshot(files)
    status, err = _run_main(argv, capsys)
    assert status == 2, err
    lines = _errors(err)
    assert len(lines) == 1 and phrase in lines[0], err
    assert "Traceback" not in err
    assert _snapshot(files) == before


def test_unreadable_kernel(files, capsys):
    status, err = _run_main(["boot", str(files / "unreadable"), "--console", "none"], capsys)
    if os.access(files / "unreadable", os.R_OK):     # root reads anything: then it is no bzImage
        assert status == 2 and len(_errors(err)) == 1
    else:
        assert status == 2 and "not readable" in _errors(err)[0]


def test_read_only_image_is_refused_even_for_root(files):
    """Root passes access(W_OK) for any file; the mode bits say the owner wants it unwritten."""
    with pytest.raises(InputError, match="read-only"):
        cli_checks.disk_image(files / "ro.img", writable=True)
    assert cli_checks.disk_image(files / "ro.img", writable=False) == files / "ro.img"


def test_fifo_does_not_block_and_dev_zero_is_not_read(files):
    """read_input opens without blocking and refuses before reading a byte."""
    with pytest.raises(InputError, match="FIFO"):
        cli_checks.read_input(files / "fifo", "kernel", 1 << 20)
    with pytest.raises(InputError, match="character device"):
        cli_checks.read_input("/dev/zero", "kernel", 1 << 20)


def test_too_large_input_is_refused_before_reading(files):
    big = files / "big"
    with open(big, "wb") as f:
        f.truncate(3 << 20)              # sparse: nothing to read, but st_size says 3 MiB
    with pytest.raises(InputError, match="more than"):
        cli_checks.read_input(big, "kernel", 2 << 20)
    assert cli_checks.read_input(files / "kernel", "kernel", 2 << 20) == (files / "kernel").read_bytes()


def test_memory_beyond_the_host_is_refused():
    host = cli_checks.host_memory()
    assert host is not None
    with pytest.raises(InputError, match="host"):
        cli_checks.memory(str(host + (1 << 30)))


@given(st.text(max_size=12))
def test_size_never_raises_anything_but_input_error(text):
    try:
        n = cli_checks.size(text)
    except InputError as e:
        assert "\n" not in str(e).strip("\n") or "\n" in text
    else:
        assert 0 <= n <= cli_checks.MAX_MEMORY


@given(st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False),
       st.sampled_from(["", "K", "M", "G", "k", "m", "g", "KiB", "MB", "Gi"]))
def test_size_agrees_with_arithmetic(number, unit):
    """The oracle is arithmetic on the decimal, not the parser's own code."""
    factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit[:1].upper()]
    expected = int(float(f"{number}") * factor)
    if expected > cli_checks.MAX_MEMORY:
        with pytest.raises(InputError, match="too large"):
            cli_checks.size(f"{number}{unit}")
    else:
        assert cli_checks.size(f"{number}{unit}") == expected


# ---- the property test: generated argument lists against the real main() ----

def _snapshot(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        st_ = p.lstat()
        content = p.read_bytes() if stat.S_ISREG(st_.st_mode) and os.access(p, os.R_OK) else None
        out[str(p)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, content)
    return out


_PATHS = ["missing", "dir", "fifo", "kernel", "empty.img", "odd.img", "ro.img", "unreadable",
          "nodir/x", "/dev/zero", "/dev/null", ""]
_VALUES = {
    "--memory": st.one_of(st.sampled_from(["inf", "infG", "nan", "1e30G", "0", "-1", "64G", "1M",
                                           "256.3M", "100T", "0x100", "lots", ""]),
                          st.text(max_size=6)),
    "--timeout": st.sampled_from(["inf", "-inf", "nan", "0", "-1", "1e400", "1e300", "x", ""]),
    "--until": st.sampled_from(["(", "[", "a{2,1}", "*", "\\", "(?P<", "a)"]),
    "--console": st.sampled_from(["nodir/log", "dir", "fifo", "/dev/zero", ""]),
    "--trace": st.sampled_from(["nodir/t", "dir", ""]),
    "--profile": st.sampled_from(["missing", "fifo", "dir", "/dev/zero", "unreadable"]),
    "--initrd": st.sampled_from(["missing", "fifo", "dir", "/dev/zero"]),
    "--net": st.sampled_from(["tap:a-name-far-too-long", "tap:a/b", "vde", "tap:..", "tap: x"]),
    "--disk-bus": st.sampled_from(["scsi", ""]),
    "--irqchip": st.sampled_from(["none", "x"]),
    "--module": st.sampled_from(["fifo", "missing", "/dev/zero"]),
    "--gdb": st.sampled_from(["tcp::99999", "tcp::0", "junk", "tcp::-1", ""]),
    "--debug-exit": st.sampled_from(["0x99999", "zz", "0xf4,3", "-1", "0xf4,0"]),
    "--fw-cfg": st.sampled_from(["junk", "name=opt/x,file=/dev/zero", "name=opt/x,file=nope",
                                 "name=x,string=y", "file=/dev/zero"]),
}
_FLAGS = ["--readonly", "--snapshot", "--rng", "--hvc", "--stats", "--no-fast-path",
          "--no-decompress", "--irqchip=user", "--disk-bus=ide"]


@st.composite
def boot_argv(draw, folder):
    def path(p):
        return p if p.startswith("/") or not p else str(folder / p)
    argv = ["boot", path(draw(st.sampled_from(_PATHS)))]
    if draw(st.booleans()):
        argv.append(path(draw(st.sampled_from(_PATHS))))
    bad = draw(st.lists(st.sampled_from(sorted(_VALUES)), min_size=0, max_size=3, unique=True))
    for opt in bad:
        value = draw(_VALUES[opt])
        if opt in ("--console", "--trace", "--profile", "--initrd", "--module"):
            value = path(value) if value and not value.startswith("/") else value
        argv.append(f"{opt}={value}")
    argv += draw(st.lists(st.sampled_from(_FLAGS), max_size=3, unique=True))
    if "--console" not in bad:
        argv += ["--console", "none"]
    return argv


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_arguments(files, capsys, data):
    """Whatever the arguments: a documented status, at most one error line, no traceback, no file
    in the folder changed. Every argument list here has at least one bad input (the kernel
    candidates are never bootable), so the status must be 2 (bad input) or 1 (a VMM error)."""
    argv = data.draw(boot_argv(files))
    before = _snapshot(files)
    status, err = _run_main(argv, capsys)
    assert status in DOCUMENTED, (argv, err)
    assert status in (1, 2), (argv, err)
    assert "Traceback" not in err, (argv, err)
    assert len(_errors(err)) <= 1, (argv, err)
    if status == 2 and not err.startswith("usage:"):
        assert len(_errors(err)) == 1, (argv, err)
    assert _snapshot(files) == before, argv


# ---- a few as the user meets them: a separate process, with a deadline for the FIFO ----

@pytest.mark.parametrize("args,phrase", [
    (["{d}/fifo"], "FIFO"),
    (["/dev/zero"], "character device"),
    (["{d}/kernel", "--memory", "1e30G"], "too large"),
    (["{d}/kernel", "--until", "("], "regular expression"),
    (["{d}/kernel", "{d}/odd.img"], "512-byte"),
])
def test_subprocess(files, args, phrase):
    argv = [a.replace("{d}", str(files)) for a in args]
    p = subprocess.run([sys.executable, "-m", "pykvm.cli", "boot", *argv, "--console", "none"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = _errors(p.stderr)
    assert len(lines) == 1 and phrase in lines[0], p.stderr


def test_table_is_true(files, capsys):
    """docs/bad-input.md: each row's example, run, gives the row's status and message."""
    table = (REPO / "docs" / "bad-input.md").read_text()
    rows = re.findall(r"^\| `pykvm ((?:boot|info|selftest|restore) [^`]*)` \| (\d+) \| ([^|]+) \|",
                      table, re.M)
    assert len(rows) >= 50
    for example, status, message in rows:
        argv = [a.replace("DIR/", f"{files}/") for a in example.split()]
        if argv[0] in ("boot", "restore") and "--console" not in argv:
            argv += ["--console", "none"]
        got, err = _run_main(argv, capsys)
        assert got == int(status), (example, err)
        assert message.strip().strip("`").replace("DIR/", f"{files}/") in err, (example, err)


@st.composite
def restore_argv(draw, folder):
    def path(p):
        return p if p.startswith("/") or not p else str(folder / p)
    argv = ["restore", path(draw(st.sampled_from(_PATHS)))]
    for opt, values in (("--until", _VALUES["--until"]), ("--timeout", _VALUES["--timeout"]),
                        ("--save-to", st.sampled_from(["nodir/x", "dir", ""])),
                        ("--save-at", _VALUES["--until"]),
                        ("--console", _VALUES["--console"])):
        if draw(st.booleans()):
            value = draw(values)
            if opt in ("--save-to", "--console") and value and not value.startswith("/"):
                value = path(value)
            argv.append(f"{opt}={value}")
    argv += draw(st.lists(st.sampled_from(["--clone", "--verify"]), max_size=2, unique=True))
    if not any(a.startswith("--console") for a in argv):
        argv.append("--console=none")
    return argv


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_restore_arguments(files, capsys, data):
    """`pykvm restore` with generated bad arguments (no argument list here names a usable
    snapshot): status 2, one error line or argparse's usage, no traceback, no file changed."""
    argv = data.draw(restore_argv(files))
    before = _snapshot(files)
    status, err = _run_main(argv, capsys)
    assert status == 2, (argv, err)
    assert "Traceback" not in err, (argv, err)
    assert len(_errors(err)) == 1 or err.startswith("usage:"), (argv, err)
    assert _snapshot(files) == before, argv


@pytest.mark.parametrize("argv, what", [
    (["boot", ""], "kernel"),
    (["boot", "{d}/kernel", "--initrd", ""], "initrd"),
    (["boot", "{d}/kernel", ""], "disk image"),
    (["boot", "{d}/kernel", "--trace", ""], "--trace"),
    (["boot", "{d}/kernel", "--profile", ""], "--profile System.map"),
    (["restore", ""], "snapshot"),
])
def test_an_empty_file_name_is_said_as_such(files, capsys, argv, what):
    """An unset shell variable (`pykvm boot "$KERNEL"`): one line naming the argument. `--initrd ''`
    booted with no initrd at all, and a kernel said 'kernel  does not exist'."""
    got, err = _run_main([a.replace("{d}", str(files)) for a in argv] + ["--console", "none"],
                         capsys)
    assert got == 2 and f"pykvm: error: {what}: an empty file name" in err, err
