"""Run shell commands in a guest over its console, and get their output and exit status.

    with LinuxVM(kernel, initrd=initramfs()) as vm:
        vm.start()
        r = vm.shell("uname -r")            # CommandResult(output='6.1.0-pykvm\\n', status=0)
        assert r.status == 0
        vm.shell("mkdir /mnt/x", check=True)    # raises CommandFailed on a non-zero status
        vm.poweroff()                       # the Stop: "halt" or "poweroff"

A console is a byte stream shared by the terminal's echo of what we type, the shell's prompt and
line editing, and the kernel's own messages. So the protocol does not look for a prompt. Each
command gets a fresh token, and the line sent is

    printf '%s%s\\n' PYKVM- <token>-B; { <command>
    } </dev/null; printf '\\n%s%s:%s\\n' PYKVM- <token>-E "$?"

The shell prints `PYKVM-<token>-B`, the command's output, a newline, and `PYKVM-<token>-E:<status>`.
The marker only exists in what printf prints: the echo of the typed line shows `PYKVM- <token>-B`,
with a space, so echo (from the tty or from ash's line editing) can never be mistaken for output,
wherever it lands. The output is everything between the begin marker's line and the newline printed
before the end marker; the tty's CRLF (ONLCR) is turned back into LF. The braces on two lines keep a
`# comment` or a trailing `&` in the command from swallowing the end marker; stdin is /dev/null so a
command that reads stdin cannot eat the protocol's next line.

Limits, admitted: the command must be complete shell syntax (an unclosed quote waits for more input
until the timeout), at most MAX_COMMAND bytes (a tty's line buffer and busybox's line editor hold
about 1-4 KiB), and `exit` ends the shell itself. Kernel messages printed while a command runs land
in its output (boot with `quiet`, or `loglevel=1`, to keep them out). The output is text: bytes that
are not UTF-8 are replaced.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Callable

from ..console import ConsoleLog, ExpectTimeout

MAX_COMMAND = 900
PREFIX = "PYKVM-"


@dataclass(frozen=True)
class CommandResult:
    """What a guest command printed (stdout and stderr, LF line ends) and its exit status."""

    output: str
    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0


class CommandFailed(Exception):
    """A command run with check=True exited non-zero."""

    def __init__(self, command: str, result: CommandResult):
        super().__init__(f"guest command {command!r} exited with status {result.status}; "
                         f"output:\n{result.output}")
        self.command = command
        self.result = result


class ShellProtocol:
    """The wire format for one command (no I/O: tested on its own). `token` must not occur in the
    command's output; a random one per command makes that certain in practice."""

    def __init__(self, token: str):
        if not re.fullmatch(r"[A-Za-z0-9]+", token):
            raise ValueError(f"token {token!r} must be letters and digits")
        self.token = token

    def line(self, command: str) -> bytes:
        """The bytes to type: the command wrapped in the two markers."""
        if not command.strip():
            raise ValueError("empty guest command")
        if len(command.encode()) > MAX_COMMAND:
            raise ValueError(f"guest command of {len(command.encode())} bytes: at most {MAX_COMMAND} "
                             "(copy a longer script into the guest in pieces)")
        if "\n" in command.rstrip("\n") or "\r" in command:
            raise ValueError("one command line at a time (join commands with ; or &&)")
        t = self.token
        return (f"printf '%s%s\\n' {PREFIX} {t}-B; {{ {command.rstrip()}\n"
                f"}} </dev/null; printf '\\n%s%s:%s\\n' {PREFIX} {t}-E \"$?\"\n").encode()

    def pattern(self) -> str:
        """The regex (for ConsoleLog.expect) that matches the answer once it is complete."""
        t = re.escape(PREFIX + self.token)
        return rf"(?s:{t}-B\r*\n(.*?)\r*\n{t}-E:(\d+)\r*\n)"

    def result(self, match: re.Match) -> CommandResult:
        output = re.sub(rb"\r+\n", b"\n", match.group(1))
        return CommandResult(output.decode("utf-8", "replace"), int(match.group(2)))

    def parse(self, console: bytes) -> CommandResult | None:
        """The answer in a console transcript, or None if it is not (yet) complete."""
        m = re.search(self.pattern().encode(), console)
        return self.result(m) if m else None


class GuestShell:
    """Commands over a guest console: `send` types bytes into it, `console` is what came out.

    The first command waits for a shell to answer: a probe line is typed every few seconds until
    its marker comes back (input typed before the shell opened the console may be lost)."""

    def __init__(self, send: Callable[[bytes], None], console: ConsoleLog):
        self._send = send
        self._console = console
        self._session = secrets.token_hex(4)
        self._seq = 0
        self.ready = False

    def _protocol(self) -> ShellProtocol:
        self._seq += 1
        return ShellProtocol(f"{self._session}x{self._seq}")

    def wait_ready(self, timeout: float = 300.0, probe_every: float = 3.0) -> None:
        """Type harmless probes until the shell answers one of them."""
        import time
        deadline = time.monotonic() + timeout
        probes = []
        while True:
            p = self._protocol()
            probes.append(p)
            self._send(p.line(":"))
            any_probe = "|".join(q.pattern() for q in probes)
            left = deadline - time.monotonic()
            try:
                self._console.expect(any_probe, timeout=max(min(probe_every, left), 0.1))
                self.ready = True
                return
            except ExpectTimeout as e:
                if self._console.closed or time.monotonic() >= deadline:
                    raise ExpectTimeout("a shell answering on the console", timeout, e.tail,
                                        stopped=self._console.closed) from None

    def run(self, command: str, timeout: float = 120.0, check: bool = False) -> CommandResult:
        """Run one command line in the guest's shell; its output and exit status."""
        p = self._protocol()
        line = p.line(command)          # checks the command before anything is sent
        if not self.ready:
            self.wait_ready(timeout)
        self._send(line)
        result = p.result(self._console.expect(p.pattern(), timeout=timeout))
        if check and not result.ok:
            raise CommandFailed(command, result)
        return result
