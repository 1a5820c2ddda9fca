"""The one exception type users see: its message is a complete, one-line explanation with a fix."""


class MoePrefetchError(Exception):
    """Bad input or an unusable environment. The CLI prints `error: <message>` and exits non-zero."""
