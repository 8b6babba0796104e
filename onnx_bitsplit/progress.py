"""Progress of a conversion on stderr: a bar per layer phase on a terminal, plain lines in a log.

Both are called as progress(phase, done, total, name), the protocol of api.quantize(): when a
phase starts (done = total = 0) and after each layer of a layer phase (done and total count the
layers' work). Progress is a courtesy: a stream that cannot be written (closed, a full disk)
silences it and never fails the conversion.
"""

from __future__ import annotations

import sys
import threading
import time

import click

from .report import printable

LOG_INTERVAL = 15.0  # seconds between two lines in a log, at most
LOG_DELAY = 10.0  # nothing in a log before this: a run that ends (or fails) sooner prints only its result


def progress_for(stream=None):
    """Bars when `stream` (default stderr) is a terminal, else plain lines."""
    stream = stream or sys.stderr
    try:
        terminal = stream is not None and stream.isatty()
    except (ValueError, OSError):  # closed
        terminal = False
    return TerminalBars(stream) if terminal else LogLines(stream)


class TerminalBars:
    """A click progress bar for each layer phase, opened once the phase's first layer is done (so
    an early error prints nothing but its own line); the bars count work, so their time
    estimates hold when layers differ in size."""

    def __init__(self, stream):
        self.stream = stream
        self.bar = None
        self.phase = None

    def __call__(self, phase: str, done: int, total: int, name: str) -> None:
        if not total:
            return
        if phase != self.phase:
            self.close()
            self.phase = phase
            self.bar = click.progressbar(length=total, label=phase, file=self.stream, show_percent=True,
                                         item_show_func=lambda item: item).__enter__()
        self.bar.update(done - self.bar.pos, printable(name)[-40:])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class LogLines:
    """Plain lines for a log, from LOG_DELAY seconds on: where the conversion is then, each phase
    as it starts, and where it is at least every LOG_INTERVAL seconds, written by a timer
    thread when the conversion reports nothing itself (one long step prints too)."""

    def __init__(self, stream, interval: float = LOG_INTERVAL, delay: float = LOG_DELAY):
        self.stream = stream
        self.interval, self.delay = interval, delay
        self.start = self.last = time.monotonic()
        self.printed = False
        self.phase, self.fraction = None, None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.timer = threading.Thread(target=self._tick, daemon=True)
        self.timer.start()

    def __call__(self, phase: str, done: int, total: int, name: str) -> None:
        with self.lock:
            if phase != self.phase:
                self.phase, self.fraction = phase, None
                if self.printed:
                    self._line(f"{phase} ...")
            if total:
                self.fraction = done / total
            if self._due():
                self._line(self._status())

    def close(self) -> None:
        self.stopped.set()
        self.timer.join()

    def _tick(self) -> None:
        while not self.stopped.wait(min(1.0, self.interval / 4)):
            with self.lock:
                if self.phase is not None and self._due():
                    self._line(self._status())

    def _due(self) -> bool:
        now = time.monotonic()
        if not self.printed:
            return now - self.start >= self.delay
        return now - self.last >= self.interval

    def _status(self) -> str:
        elapsed = time.monotonic() - self.start
        done = "" if self.fraction is None else f" {100 * self.fraction:.0f}% of its work,"
        return f"{self.phase}:{done} {elapsed:.0f} s since the start"

    def _line(self, text: str) -> None:
        self.last, self.printed = time.monotonic(), True
        if self.stream is None:
            return
        try:
            self.stream.write(f"onnx-bitsplit: {text}\n")
            self.stream.flush()
        except (OSError, ValueError):  # closed, or a full disk: progress is a courtesy
            self.stream = None
