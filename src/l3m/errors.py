"""The library's own error types: every bad input a user can give is reported as one of these."""


class L3MError(Exception):
    """Base class of l3m's errors. The CLI prints their message on one line, without a traceback."""


class L3MConfigError(L3MError, ValueError):
    """A config field, constraint or reward reference is invalid. The message names the field and the fix."""


class L3MDataError(L3MError, ValueError):
    """The task data cannot be used: missing columns, empty splits, nothing left after filtering."""
