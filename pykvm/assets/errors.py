"""The one exception the asset builders raise.

Every failure a user can fix (no network, a missing Debian package, not root,
a kernel build that broke) becomes an :class:`AssetError` whose message is a
single line naming the fix. The CLI prints it as ``pykvm: error: ...`` and
exits 2, without a traceback.
"""


class AssetError(Exception):
    """A default asset could not be fetched or built; the message says why and what to do."""
