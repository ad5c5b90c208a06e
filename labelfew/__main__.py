"""The `labelfew` script and `python -m labelfew` (so that `accelerate launch -m labelfew ...` and
`torchrun -m labelfew ...` work).

SIGINT/SIGTERM exit 130/143 with one line from the first moment: here until the CLI is imported
(typer and rich take a few tenths of a second), then `labelfew.cli.guarded`, then the training
loop, which checkpoints first (`labelfew.engine.signals`). Python's KeyboardInterrupt during an
import printed a traceback instead.
"""

import os
import signal  # nothing slower before the handler is in place (not even typing)


def _stop_at_once(number: int, frame: object) -> None:
    os.write(2, f"interrupted: stopped by {signal.Signals(number).name}\n".encode())
    os._exit(128 + number)


def main() -> None:
    """Entry point: the startup signal handler, then the Typer app."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _stop_at_once)
    from labelfew.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
