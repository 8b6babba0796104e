"""A signal sent in a window where the product holds signals back (tests of errors, modelio and store)."""

import os
import signal
import time
from contextlib import contextmanager

from onnx_bitsplit.errors import Terminated


def then_signalled(function):
    """`function`, then SIGTERM to this process, delivered before the call returns. The process has
    other threads (numpy's BLAS, onnxruntime's) that do not block it: if the main thread does,
    one of them takes it, and Python runs the handler in the main thread all the same."""
    def call(*args, **kwargs):
        result = function(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # delivered by now, to whichever thread does not block it
        return result
    return call


@contextmanager
def sigterm_raises_terminated():
    """SIGTERM handled as the command handles it: Terminated raised in the main thread."""
    def raise_terminated(signum, frame):
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
