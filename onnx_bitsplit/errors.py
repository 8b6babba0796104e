"""User-facing errors: one line that names the culprit."""

import signal


class BitsplitError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits with 1."""


class ModelError(BitsplitError):
    """The model cannot be read, is invalid, or has nothing this tool can quantize."""


class CalibrationError(BitsplitError):
    """The calibration data is missing, unreadable, or does not fit the model."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread and unwound like Ctrl-C's KeyboardInterrupt,
    so that every temporary file is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @staticmethod
    def describe(signum: int) -> str:
        return "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (libraries write several), or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
