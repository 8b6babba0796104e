"""The `onnx-bitsplit` command's entry point (and `python -m onnx_bitsplit`).

Signals are handled before anything heavy is imported, so Ctrl-C, SIGTERM or SIGHUP at any moment
end the process with one line and exit code 128 + the signal's number, nothing left behind. While
the heavy modules import, a signal is only noted: an exception raised in the middle of a compiled
module's initialisation (onnx's, onnxruntime's) can leave it half made, and the process then
crashes (SIGSEGV, SIGABRT) instead of exiting; the noted signal ends the run once they are loaded.
"""

import signal
import sys

from .errors import Terminated


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main() -> None:
    received = []

    def note(signum, frame):
        received.append(signum)

    def terminate(signum, frame):  # Ctrl-C too: a KeyboardInterrupt escaping would make Python
        received.append(signum)    # re-kill itself with SIGINT instead of exiting with our code
        raise Terminated(signum)

    for signum in SIGNALS:
        signal.signal(signum, note)
    try:
        from .cli import main as run

        for signum in SIGNALS:
            signal.signal(signum, terminate)
        if received:  # noted during the imports
            raise Terminated(received[0])
        run()
    except SystemExit:
        raise
    except BaseException:
        if not received:  # a broken installation: its traceback is the report
            raise
        # a signal outside the command's own handling: noted during the imports, or as the command exits
        print(f"Error: {Terminated.describe(received[0])}", file=sys.stderr)
        sys.exit(128 + received[0])
    finally:  # the outcome is decided: a late signal must not change the exit code
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    main()
