"""The one exception type users see: a one-line message naming what is at fault."""


class PeakcError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with code 2."""

    exit_code = 2
