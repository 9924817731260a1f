"""Signal handling: SIGTERM and SIGINT ask the training loop to stop after the current step.

This module does not import torch, so the handlers are in place before the slow torch import.
"""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """The first stop signal received, or None. The training loop polls it between steps.

    The handler only records the signal, so a signal never interrupts a step or a checkpoint
    write half way. A process that must end at once needs SIGKILL. The atomic save leaves at
    most a temp file then, never a partial file under a checkpoint name.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def install(self) -> dict[int, Any]:
        """Install the handlers and return the previous ones for `restore`.

        SIGXFSZ is ignored as well, so that exceeding the file size limit (ulimit -f) makes the
        checkpoint write raise OSError (EFBIG) instead of killing the process.
        """
        previous = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        return previous

    @staticmethod
    def restore(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
