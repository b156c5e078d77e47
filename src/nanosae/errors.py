"""Errors with one-line messages. The CLI prints them without a traceback and exits non-zero."""


class NanosaeError(Exception):
    """Base class: every error nanosae raises on purpose is one of these."""


class ConfigError(NanosaeError):
    """A config value is missing, unknown or inconsistent."""


class FormatError(NanosaeError):
    """A file is missing, corrupt, truncated or has the wrong shapes."""


class ShapeError(NanosaeError):
    """A tensor has the wrong shape for the SAE or model it was given to."""


class HookError(NanosaeError):
    """An unknown hook name or a layer index out of range."""


class DataError(NanosaeError):
    """Bad input data: empty corpus, undecodable text, NaN activations, mismatched store."""


class TrainingError(NanosaeError):
    """Training diverged (NaN/inf loss) or cannot continue."""


def first_line(e: BaseException) -> str:
    """The first line of a third-party exception's message (its type when it has none), for a one-line error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
