"""One exception hierarchy for the toolkit, and the "did you mean" hint its messages share.

Every message names the offending path or value and says what to do about it, so
entry points can print ``str(err)`` and exit without a traceback.
"""


import difflib
from typing import Iterable


class QATError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class EnvironmentSetupError(QATError):
    """The offline-safe runtime could not be prepared (e.g. no writable config dir)."""


class ModelNotFoundError(QATError, FileNotFoundError):
    """A requested model (checkpoint or YAML) does not exist locally."""


class ModelLoadError(QATError):
    """A model file exists but cannot be used (corrupt, wrong task, wrong format)."""


class DataError(QATError):
    """A data YAML or the images it points at are missing or malformed."""


class ConfigError(QATError, ValueError):
    """A configuration key, value or combination is invalid; the message says which and how to fix it."""


def suggest(name: str, valid: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest valid name, or "" when nothing is close."""
    close = difflib.get_close_matches(str(name), list(valid), n=2, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"
