"""Errors bertlite raises for bad input; each message names the problem and the fix."""


class BertliteError(Exception):
    """Base class of bertlite's own errors."""


class DataError(BertliteError, ValueError):
    """A corpus, data folder or data setting that cannot be used."""


class CheckpointError(BertliteError, ValueError):
    """A checkpoint that is missing, damaged or incompatible."""


class BackendError(BertliteError, ValueError):
    """An unknown backend or one that fails to load."""


class DeviceError(BertliteError, ValueError):
    """A device that does not exist or cannot be parsed."""
