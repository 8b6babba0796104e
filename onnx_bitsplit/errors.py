"""User-facing errors: one line that names the culprit; the signals that interrupt a run."""

import signal
import threading


class BitsplitError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits with 1."""


class OptionsError(BitsplitError):
    """Options that cannot work together or on this model (the CLI exits with 2, a usage error)."""


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


class signals_held:
    """Ctrl-C, SIGTERM and SIGHUP held back until the block ends, then delivered. Blocking them
    in the main thread is not enough: the process has other threads (numpy's BLAS, onnxruntime's
    workers), the kernel hands the signal to one of those, and Python runs the handler in the main
    thread all the same. So for the block the handlers are swapped for one that notes the signal
    (only the main thread can set handlers, and only it runs them)."""

    SIGNALS = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}

    def __enter__(self):
        self.noted, self.previous = [], {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, lambda signum, frame: self.noted.append(signum))
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for signum in dict.fromkeys(self.noted):
            signal.raise_signal(signum)
        return False


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (libraries write several), or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
