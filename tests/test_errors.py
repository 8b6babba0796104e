"""User-facing errors and the signals that interrupt a run."""

import os
import signal
import time

import pytest

from interrupts import sigterm_raises_terminated
from onnx_bitsplit.errors import BitsplitError, CalibrationError, ModelError, Terminated, first_line, signals_held


def test_first_line_of_a_library_error():
    assert first_line(ValueError("shape mismatch\n  at node 3\n  at node 4")) == "shape mismatch"
    assert first_line(ValueError("\n  indented first line\nsecond")) == "indented first line"
    assert first_line(KeyError()) == "KeyError"


def test_terminated_describes_its_signal():
    assert Terminated.describe(signal.SIGINT) == "interrupted"
    assert Terminated.describe(signal.SIGTERM) == "terminated by SIGTERM"
    assert Terminated.describe(signal.SIGHUP) == "terminated by SIGHUP"
    assert Terminated(signal.SIGHUP).signum == signal.SIGHUP
    assert not isinstance(Terminated(signal.SIGTERM), Exception)  # unwound like Ctrl-C, past `except Exception`
    assert issubclass(ModelError, BitsplitError) and issubclass(CalibrationError, BitsplitError)


def test_a_signal_during_a_held_block_is_delivered_when_it_ends():
    done = []
    with sigterm_raises_terminated(), pytest.raises(Terminated):
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # delivered by now, to whichever thread does not block it
            done.append("the block ran to its end")
    assert done == ["the block ran to its end"]


def test_a_held_block_without_a_signal_restores_the_handlers():
    before = {signum: signal.getsignal(signum) for signum in signals_held.SIGNALS}
    with signals_held():
        assert all(signal.getsignal(signum) is not before[signum] for signum in signals_held.SIGNALS)
    assert {signum: signal.getsignal(signum) for signum in signals_held.SIGNALS} == before
