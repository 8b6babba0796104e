"""The `onnx-bitsplit` command's entry point (and `python -m onnx_bitsplit`).

Signals are handled before anything heavy is imported, so Ctrl-C, SIGTERM or SIGHUP at any moment
end the process with one line and exit code 128 + the signal's number, nothing left behind.
"""

import signal
import sys

from .errors import Terminated


def main() -> None:
    received = []

    def terminate(signum, frame):  # Ctrl-C too: a KeyboardInterrupt escaping would make Python
        received.append(signum)    # re-kill itself with SIGINT instead of exiting with our code
        raise Terminated(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, terminate)
    try:
        from .cli import main as run

        run()
    except SystemExit:
        raise
    except BaseException:
        if not received:  # a broken installation: its traceback is the report
            raise
        # a signal outside the command's own handling: during the imports (inside a compiled
        # module's initialisation it comes out as an ImportError) or as the command exits
        print(f"Error: {Terminated.describe(received[0])}", file=sys.stderr)
        sys.exit(128 + received[0])
    finally:  # the outcome is decided: a late signal must not change the exit code
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    main()
