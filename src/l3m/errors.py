"""The library's own error types: every bad input a user can give is reported as one of these."""


class L3MError(Exception):
    """Base class of l3m's errors. The CLI prints their message on one line, without a traceback."""


class L3MConfigError(L3MError, ValueError):
    """A config field, constraint or reward reference is invalid. The message names the field and the fix."""


class L3MDataError(L3MError, ValueError):
    """The task data cannot be used: missing columns, empty splits, nothing left after filtering."""


class L3MTrainingStopped(L3MError, RuntimeError):
    """Training stopped before ``max_steps`` after saving a checkpoint to resume from: on SIGTERM/SIGINT
    (``signum`` is the signal), or after ``max_consecutive_skipped_steps`` non-finite steps in a row."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum
