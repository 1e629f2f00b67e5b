"""The errors a user can fix: bad settings, files and data.

Each message names the setting or file at fault and the fix. The command line prints
them as one line (no traceback); from Python they are ordinary exceptions:
``InputError`` is a ``ValueError`` and ``MissingInputError`` a ``FileNotFoundError``.
"""


class InputError(ValueError):
    """A setting, file or dataset the user gave cannot be used as it is."""


class MissingInputError(InputError, FileNotFoundError):
    """A file, folder or model the settings point to does not exist."""
