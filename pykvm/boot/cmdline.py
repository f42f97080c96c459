"""The kernel command line: an ordered list of `key` / `key=value` arguments.

Linux splits the command line on spaces outside double quotes (lib/cmdline.c next_arg), so a value
with spaces is written `key="a b"`. Everything after a lone `--` is passed to init, not parsed by the
kernel; arguments we add go before it. Order matters (for repeated keys such as console=, the last one
wins the /dev/console), so this keeps the order arguments were given in.

The buffer the kernel copies is at most setup_header.cmdline_size bytes, without the terminating NUL
(boot.rst); a longer line is silently cut by the kernel, so we refuse it instead.
"""

from __future__ import annotations

from pykvm.boot.errors import BootError


def split_args(text: str) -> list[str]:
    """Split like the kernel: on whitespace outside double quotes; quotes are kept in the tokens."""
    args, cur, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch.isspace() and not quoted:
            if cur:
                args.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if quoted:
        raise BootError(f"command line has an unbalanced double quote: {text!r}")
    if cur:
        args.append("".join(cur))
    return args


def _key(arg: str) -> str:
    return arg.split("=", 1)[0].replace('"', "")


class Cmdline:
    """A kernel command line being built.

    >>> c = Cmdline("console=ttyS0 quiet")
    >>> c.add("panic", -1); c.add_default("root", "/dev/vda")
    >>> str(c)
    'console=ttyS0 quiet panic=-1 root=/dev/vda'
    """

    def __init__(self, text: str = ""):
        self._args: list[str] = []        # kernel arguments, in order
        self._init_args: list[str] | None = None   # after "--", if present
        self.extend(text)

    def extend(self, text: str) -> "Cmdline":
        """Append user-written text (several arguments, possibly with `--` and init arguments)."""
        if "\0" in text:
            raise BootError("command line contains a NUL byte, which would end it early: remove it")
        for arg in split_args(text):
            if self._init_args is not None:
                self._init_args.append(arg)
            elif arg == "--":
                self._init_args = []
            else:
                self._args.append(arg)
        return self

    def add(self, key: str, value: object = None) -> "Cmdline":
        """Append `key` or `key=value` (before any `--`). A value with spaces is quoted."""
        if not key or any(c.isspace() or c in '="\0' for c in key):
            raise BootError(f"bad command line key {key!r}: keys have no spaces, '=', quotes or NULs")
        if value is None:
            self._args.append(key)
            return self
        text = str(value)
        if any(c in '"\0' for c in text):
            raise BootError(f"bad value for {key}=: {text!r} contains a double quote or NUL, which "
                            f"the kernel cannot parse")
        if not text or any(c.isspace() for c in text):
            text = f'"{text}"'
        self._args.append(f"{key}={text}")
        return self

    def add_default(self, key: str, value: object = None) -> "Cmdline":
        """Add `key=value` unless the line already has `key` (the root= rule: the user's wins)."""
        if not self.has(key):
            self.add(key, value)
        return self

    def replace(self, key: str, value: object) -> "Cmdline":
        """Put one `key=value` where the first `key` was, dropping every other `key`."""
        at = next((i for i, a in enumerate(self._args) if _key(a) == key), len(self._args))
        self._args = [a for a in self._args if _key(a) != key]
        self.add(key, value)
        self._args.insert(at, self._args.pop())
        return self

    def remove(self, key: str) -> "Cmdline":
        """Drop every `key` argument (before any `--`)."""
        self._args = [a for a in self._args if _key(a) != key]
        return self

    def has(self, key: str) -> bool:
        return any(_key(a) == key for a in self._args)

    def get(self, key: str) -> str | None:
        """The value of the last `key=...` (quotes removed), "" for a bare `key`, None if absent."""
        for arg in reversed(self._args):
            if _key(arg) == key:
                return arg.split("=", 1)[1].replace('"', "") if "=" in arg else ""
        return None

    def __str__(self) -> str:
        parts = list(self._args)
        if self._init_args is not None:
            parts += ["--", *self._init_args]
        return " ".join(parts)

    def __repr__(self) -> str:
        return f"Cmdline({str(self)!r})"

    def encode(self, max_len: int) -> bytes:
        """The NUL-terminated bytes to put in guest memory; `max_len` excludes the NUL (cmdline_size)."""
        data = str(self).encode()
        if len(data) > max_len:
            raise BootError(f"command line is {len(data)} bytes but this kernel accepts at most "
                            f"{max_len} (setup_header.cmdline_size): shorten it")
        return data + b"\0"
