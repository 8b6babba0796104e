"""Progress on stderr: plain lines in a log from a delay on, bars on a terminal, never a failure."""

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onnx_bitsplit.progress import LogLines, TerminalBars, progress_for

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """A stream that records when each line arrives."""

    def __init__(self):
        self.start, self.lines = time.monotonic(), []

    def write(self, text):
        self.lines += [(time.monotonic() - self.start, line) for line in text.splitlines()]

    def flush(self):
        pass


def test_a_log_gets_nothing_before_the_delay_then_lines_on_its_own():
    stream = Clock()
    log = LogLines(stream, interval=0.3, delay=0.5)
    log("prepare", 0, 0, "")
    time.sleep(0.2)
    assert stream.lines == []  # a run that ends (or fails) this soon prints only its result
    time.sleep(1.2)  # the conversion reports nothing: the timer writes
    log.close()
    times = [t for t, _ in stream.lines]
    assert len(times) >= 2 and 0.45 <= times[0] < 1.2
    assert all(line.startswith("onnx-bitsplit: prepare") and "\r" not in line for _, line in stream.lines)


def test_a_log_announces_each_phase_once_it_has_started_printing():
    stream = io.StringIO()
    log = LogLines(stream, interval=60, delay=0)
    log("prepare", 0, 0, "")
    log("layers", 0, 0, "")
    log("layers", 5, 10, "conv")
    log("write", 0, 0, "")
    log.close()
    assert stream.getvalue().splitlines() == [
        "onnx-bitsplit: prepare: 0 s since the start", "onnx-bitsplit: layers ...", "onnx-bitsplit: write ..."]


@pytest.mark.parametrize("stream", [None, "closed", "full"])
def test_a_stream_that_cannot_be_written_silences_progress(stream):
    if stream == "closed":
        stream = io.StringIO()
        stream.close()
    elif stream == "full":
        stream = open(os.devnull, "w") if not Path("/dev/full").exists() else open("/dev/full", "w")
    log = LogLines(stream, interval=0.1, delay=0)
    for done in range(3):
        log("layers", done, 3, "conv")
        time.sleep(0.15)
    log.close()  # no exception, and the conversion goes on


def test_bars_on_a_terminal_only():
    assert isinstance(progress_for(io.StringIO()), LogLines)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bars = progress_for(Terminal())
    assert isinstance(bars, TerminalBars)
    bars("prepare", 0, 0, "")  # phase starts draw nothing
    assert bars.bar is None
    bars("layers", 3, 10, "conv")
    assert bars.bar is not None and bars.bar.pos == 3
    bars.close()


@pytest.mark.slow
def test_a_conversion_in_a_log_prints_progress_within_30_seconds(tmp_path):
    """The command with stderr a pipe, as in a CI job: its first progress line comes within 30 s
    (every row sampled and more iterations make the embedded model's conversion last far
    longer than that; it is stopped once the line has come)."""
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "onnx_bitsplit", ROOT / "models/efficientnet-lite0.onnx", tmp_path / "q.onnx",
         "--calib", ROOT / "models/calibration", "--sample-rows", "0", "--iterations", "30"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    line = process.stderr.readline()
    first = time.monotonic() - start
    process.terminate()
    process.stderr.close()
    assert process.wait() == 143  # still converting when the line came
    assert line.startswith("onnx-bitsplit: ") and first <= 30
    assert not (tmp_path / "q.onnx").exists()
