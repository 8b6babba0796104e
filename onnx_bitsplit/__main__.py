"""The `onnx-bitsplit` command's entry point (and `python -m onnx_bitsplit`).

Signals are handled before anything heavy is imported, so Ctrl-C, SIGTERM or SIGHUP at any moment
end the process with one line and exit code 128 + the signal's number, nothing left behind.
"""

import signal
import sys

from .errors import Terminated


def _terminate(signum, frame):
    raise Terminated(signum)


def main() -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    try:
        from .cli import main as run
    except (KeyboardInterrupt, Terminated) as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        print(f"Error: {Terminated.describe(signum)}", file=sys.stderr)
        sys.exit(128 + signum)
    run()


if __name__ == "__main__":
    main()
