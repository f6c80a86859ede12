"""One exception hierarchy for the toolkit.

Every message names the offending path or value and says what to do about it, so
entry points can print ``str(err)`` and exit without a traceback.
"""


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
