"""One exception family: the CLI prints these as one readable line (no traceback)."""


class ClbenchError(Exception):
    """A user-facing error: bad config, missing data, unknown name, ..."""


class ConfigError(ClbenchError):
    pass


class DataError(ClbenchError):
    """Task data that cannot be read or prepared (a malformed file, a missing release, ...)."""


class TrainingError(ClbenchError):
    """Training cannot go on: a non-finite loss, a batch that cannot be split, no parameter to train."""
