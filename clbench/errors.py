"""One exception family: the CLI prints these as one readable line (no traceback)."""


class ClbenchError(Exception):
    """A user-facing error: bad config, missing data, unknown name, ..."""


class ConfigError(ClbenchError):
    pass


class DataError(ClbenchError):
    """Task data that cannot be read or prepared (a malformed file, a missing release, ...)."""


class SourceUnavailable(DataError):
    """The registry cannot serve a pinned source package: pip could not download it (the version is
    gone, the registry is unreachable) or what it served is not the pinned file (another sha256).
    Only this failure lets clbench fall back to a task's shipped copy; a damaged cached archive or a
    member a builder asks for that the pinned file lacks is a fault to report, not to paper over."""


class TrainingError(ClbenchError):
    """Training cannot go on: a non-finite loss, a batch that cannot be split, no parameter to train."""


class RunDirError(ClbenchError):
    """A run directory that cannot be used as it is: held by another process, written by someone
    else, with damaged results files or over changed data."""


class SweepError(ClbenchError):
    """A sweep or tune that cannot be planned or launched as given."""
