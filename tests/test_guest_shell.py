"""The guest-command protocol (pykvm.testing.shell) without KVM: made-up console transcripts, and
a real busybox shell on a host pseudo-terminal, which echoes input and writes CRLF like a guest's
serial console does."""

import os
import pty
import shutil
import subprocess
import threading

import pytest

from pykvm.console import ConsoleLog, ExpectTimeout
from pykvm.testing.shell import (MAX_COMMAND, CommandFailed, CommandResult, GuestShell,
                                 ShellProtocol)

P = ShellProtocol("t0k3n")


def answer(output: bytes, status: int, token: str = "t0k3n") -> bytes:
    """What a shell prints for the protocol's line, with the tty's CRLF."""
    text = b"PYKVM-%s-B\n%s\nPYKVM-%s-E:%d\n" % (token.encode(), output, token.encode(), status)
    return text.replace(b"\n", b"\r\n")


def test_the_line_holds_the_markers_only_split():
    line = P.line("echo hi").decode()
    assert "PYKVM-t0k3n" not in line          # so the echo of it never looks like an answer
    assert "PYKVM- t0k3n-B" in line and "PYKVM- t0k3n-E" in line
    assert line.endswith("\n") and line.count("\n") == 2


@pytest.mark.parametrize("output, expected", [
    (b"hello\n", "hello\n"),
    (b"", ""),
    (b"no newline at the end", "no newline at the end"),
    (b"two\nlines\n", "two\nlines\n"),
    (b"blank line follows\n\n", "blank line follows\n\n"),
])
def test_output_between_the_markers_with_crlf_undone(output, expected):
    echo = P.line("some command").replace(b"\n", b"\r\n")
    transcript = b"~ # " + echo + answer(output, 0) + b"~ # "
    assert P.parse(transcript) == CommandResult(expected, 0)


def test_exit_status_and_prompt_noise():
    transcript = b"\x1b[6n/ # " + P.line("false") + answer(b"", 1) + b"/ # "
    assert P.parse(transcript) == CommandResult("", 1)
    assert P.parse(answer(b"sh: nope: not found\n", 127)).status == 127


def test_an_answer_is_not_complete_before_its_status_line_ends():
    full = answer(b"x\n", 123)
    assert P.parse(full[:-2]) is None            # "...-E:123" without its line end: maybe "1234"
    assert P.parse(full[:20]) is None
    assert P.parse(full) == CommandResult("x\n", 123)


def test_another_commands_answer_is_ignored():
    assert P.parse(answer(b"other\n", 0, token="0ther")) is None


def test_bad_commands_are_refused_before_sending():
    for bad in ["", "   ", "a\nb", "x" * (MAX_COMMAND + 1), "echo\r"]:
        with pytest.raises(ValueError):
            P.line(bad)
    with pytest.raises(ValueError):
        ShellProtocol("has space")


class PtyShell:
    """busybox sh (interactive, with line editing) on a pseudo-terminal: a guest console stand-in."""

    def __init__(self):
        busybox = shutil.which("busybox")
        if busybox is None:
            pytest.skip("needs busybox on the host (Debian: busybox-static)")
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([busybox, "sh", "-i"], stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, env={"PATH": "/usr/bin:/bin", "PS1": "~ # "})
        os.close(slave)
        self.console = ConsoleLog()
        self.sent = []
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self):
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                break
            if not data:
                break
            self.console.write(data)
        self.console.close()

    def send(self, data: bytes):
        self.sent.append(data)
        os.write(self.master, data)

    def close(self):
        # The pump must be gone before the master's descriptor is closed: the next test's
        # openpty() gets the same number, and a pump still looping would read (and lose) that
        # pty's output - seen as a shell whose answers never came, once in ~25 runs under load.
        # With the shell dead and our slave closed, the master's read ends (EIO).
        self.proc.kill()
        self.proc.wait()
        self._pump_thread.join(timeout=30)
        assert not self._pump_thread.is_alive(), "the pty pump did not end with the shell"
        os.close(self.master)


@pytest.fixture
def sh():
    s = PtyShell()
    yield s
    s.close()


def test_commands_on_a_real_shell_with_echo_and_crlf(sh):
    shell = GuestShell(sh.send, sh.console)
    assert shell.run("echo hello") == CommandResult("hello\n", 0)
    assert b"\r\n" in sh.console.data                 # the tty did write CRLF
    r = shell.run("cd /; ls /nonexistent-dir; echo after # a comment")
    assert r.status == 0 and r.output.endswith("after\n") and "nonexistent-dir" in r.output
    assert shell.run("pwd").output == "/\n"           # the shell's state persists between commands
    assert shell.run("exit_status_is_127_for_a_missing_command").status == 127
    assert shell.run("printf 'a\\nb'") == CommandResult("a\nb", 0)
    assert shell.run("(exit 3)").status == 3
    assert shell.run("cat").output == ""              # stdin is /dev/null: cat ends at once
    with pytest.raises(CommandFailed) as e:
        shell.run("echo oops; false", check=True)
    assert e.value.result == CommandResult("oops\n", 1)


def test_a_shell_that_starts_late_gets_probed(sh):
    # Nothing answers until the first probe is read: the shell is ready either way, and a probe
    # the shell answers late does not end up in a command's output.
    shell = GuestShell(sh.send, sh.console)
    shell.wait_ready(timeout=30, probe_every=0.2)
    assert shell.ready and len(sh.sent) >= 1
    assert shell.run("echo x").output == "x\n"


def test_a_closed_console_fails_at_once():
    console = ConsoleLog()
    console.close()
    shell = GuestShell(lambda data: None, console)
    with pytest.raises(ExpectTimeout):
        shell.run("echo never", timeout=600)


def test_waiting_on_a_console_whose_vm_stopped_says_so_not_a_timeout():
    """A VM that stops (a panic) closes its console: expect() gives up at once, and its error
    says the VM stopped, not that the whole timeout went by."""
    console = ConsoleLog()
    console.write(b"Kernel panic - not syncing: Attempted to kill init!\n")
    console.close()
    with pytest.raises(ExpectTimeout) as e:
        console.expect("login:", timeout=120)
    assert str(e.value).startswith("'login:' did not appear before the VM stopped; console ended")
    with pytest.raises(ExpectTimeout) as e:
        GuestShell(lambda data: None, console).run("true", timeout=120)
    assert "a shell answering on the console' did not appear before the VM stopped" in str(e.value)
    assert "Kernel panic" in str(e.value)


@pytest.mark.kvm
def test_shell_and_poweroff_on_kvm_pvm_say_at_once_that_userland_cannot_run(kernel):
    """Nothing boots: on a KVM-PVM host the guest's userland never runs, so no shell answers."""
    from conftest import kvm_unusable_reason
    from pykvm import LinuxVM, pvm
    from pykvm.machine import MachineError
    if kvm_unusable_reason() or pvm.host_kind() != pvm.KVM_PVM:
        pytest.skip(kvm_unusable_reason() or "this host's /dev/kvm is not KVM-PVM")
    with LinuxVM(kernel.bzimage, memory="64M") as vm:
        for call in (lambda: vm.shell("uname -r"), vm.poweroff):
            with pytest.raises(MachineError, match="needs guest userland, which cannot run on "
                                                   "this KVM-PVM host: mark the test amdv"):
                call()
