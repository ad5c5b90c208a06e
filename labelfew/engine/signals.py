"""SIGINT/SIGTERM during training: finish the step, write a checkpoint, exit 130/143."""

from __future__ import annotations

import signal
from typing import Any

from labelfew.errors import Interrupted


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the training loop checks after each step.

    The loop then writes a checkpoint and raises `Interrupted` (exit code 130 or 143). A second
    signal of the same kind stops at once, as usual.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: Any) -> None:

        if self.received is not None:
            signal.signal(number, self._previous.get(number, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.received = number

    def __exit__(self, *exc: object) -> None:

        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def raise_if_received(self, hint: str) -> None:
        """Raises `Interrupted` when a signal arrived; `hint` says where the checkpoint is."""
        if self.received is None:
            return

        name = signal.Signals(self.received).name
        raise Interrupted(f"stopped by {name}; {hint}", exit_code=128 + self.received)
