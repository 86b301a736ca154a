"""Errors that the command line reports as one line on stderr (no traceback without ``--debug``)."""


class HCFormerError(Exception):
    """A user-facing error: bad input, a missing file, a malformed key.

    The message must name the file, key or value at fault and what was expected.
    ``hcformer.cli`` prints it as one line and exits with status 2.
    """


class ConfigError(HCFormerError, ValueError):
    """A configuration key or value that is unknown, misspelt or of the wrong type."""


class DataError(HCFormerError, ValueError):
    """A dataset file that is missing, unreadable or malformed."""
