"""The errors a user can fix: bad settings, files and data.

Each message names the setting or file at fault and the fix. The command line prints
them as one line (no traceback); from Python they are ordinary exceptions:
``InputError`` is a ``ValueError`` and ``MissingInputError`` a ``FileNotFoundError``.
Input that RecBole accepts but that is probably not what the user meant gets a
warning instead, once per run (:func:`warn_once`).
"""
import logging


class InputError(ValueError):
    """A setting, file or dataset the user gave cannot be used as it is."""


class MissingInputError(InputError, FileNotFoundError):
    """A file, folder or model the settings point to does not exist."""


#: Warnings already given in this process (a config is built several times per run).
_warned: set = set()


def warn_once(message: str, logger: logging.Logger | None = None) -> bool:
    """Log ``message`` as a warning unless this process already has; True if logged."""
    if message in _warned:
        return False
    _warned.add(message)
    (logger or logging.getLogger("recbole_llm")).warning(message)
    return True
