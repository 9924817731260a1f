"""Process and log helpers shared by the SIGKILL trials of the trainer and of the watcher.

The trials live in helpers_crash_trainer.py and helpers_crash_watcher.py, so that
tests/test_crashes.py runs a few of them in CI and bench/crash_trainer.py and
bench/crash_watcher.py run many. Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


class LogTail:
    """Complete lines that a running process has appended to its log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self._offset = 0
        self._partial = b""

    def read(self) -> list[str]:
        """Read what was appended since the last call and return the new complete lines."""
        try:
            with open(self.path, "rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        new = [line.decode("utf-8", "replace") for line in complete]
        self.lines.extend(new)
        return new

    def count(self, text: str) -> int:
        self.read()
        return sum(text in line for line in self.lines)


class LoggedProcess:
    """A child process whose stdout and stderr go to one log file that the caller tails."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log_file = open(log_path, "wb")  # noqa: SIM115 - open as long as the process
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=self._log_file, stderr=subprocess.STDOUT
        )
        self.tail = LogTail(log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for_line(self, text: str, timeout: float, interval: float = 0.005) -> str | None:
        """Return the first log line containing `text`, or None on timeout or process exit."""
        deadline = time.monotonic() + timeout
        while True:
            self.tail.read()
            for line in self.tail.lines:
                if text in line:
                    return line
            if self.process.poll() is not None:
                self.tail.read()
                return next((line for line in self.tail.lines if text in line), None)
            if time.monotonic() >= deadline:
                return None
            time.sleep(interval)

    def kill(self) -> int:
        """Send SIGKILL, reap the process and return its exit status."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        status = self.process.wait()
        self._log_file.close()
        self.tail.read()
        return status

    def stop(self, timeout: float = 30.0) -> int:
        """Send SIGTERM and return the exit status, sending SIGKILL if it still runs at timeout."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        self._log_file.close()
        self.tail.read()
        return status


def start_watcher(folder: Path, options: list[str], log_path: Path) -> LoggedProcess:
    """Start the watcher daemon, `python -m watcher FOLDER OPTIONS`, logging to `log_path`."""
    return LoggedProcess([PYTHON, "-m", "watcher", str(folder), *options], log_path)


def run_watcher_once(folder: Path, options: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "watcher", str(folder), "--once", *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def busy_wait(seconds: float) -> None:
    """Wait with sub-millisecond precision, which time.sleep does not give."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def percentile(samples: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of `samples`."""
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]
