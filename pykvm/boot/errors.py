"""The one exception the boot stages raise."""


class BootError(Exception):
    """A kernel image or boot request pykvm cannot use.

    The message is ONE line that names the problem and what to do about it, so a CLI can print it as
    is: "no 'HdrS' magic at 0x202: this is not a bzImage (pass a bzImage or an ELF vmlinux)".
    """

    def __init__(self, message: str):
        # Keep the one-line promise even when a message embeds a library's multi-line error text.
        super().__init__(" ".join(str(message).split()))
