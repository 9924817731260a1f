"""Shared helpers: real checkpoint bytes from torch.save and folders built from a short spec."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Samples:
    """Bytes of real files: a complete torch checkpoint and damaged or foreign variants."""

    valid: bytes
    legacy: bytes
    truncated: bytes
    foreign_zip: bytes


def _torch_bytes(**options) -> bytes:
    import torch

    state = {
        "model": {"weight": torch.arange(64, dtype=torch.float32).reshape(8, 8)},
        "step": 1,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer, **options)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def samples() -> Samples:
    valid = _torch_bytes()
    foreign = io.BytesIO()
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    return Samples(
        valid=valid,
        legacy=_torch_bytes(_use_new_zipfile_serialization=False),
        truncated=valid[: len(valid) // 2],
        foreign_zip=foreign.getvalue(),
    )


def write_file(path: Path, data: bytes, mtime: float | None = None) -> None:
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def run_watcher(*args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m watcher` as a real process from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll predicate until it returns true or timeout seconds pass; return its last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


def save_atomically(path: Path, data: bytes) -> None:
    """Write data the way a careful trainer does: a temp name, then a rename onto the final name."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


class WatcherProcess:
    """A real `python -m watcher` daemon whose log goes to a file the test can read."""

    def __init__(
        self,
        *args: str,
        log_dir: Path,
        env: dict | None = None,
        wrapper: list[str] | None = None,
        **popen,
    ) -> None:
        """Start the watcher with args, or run `wrapper` instead when the test builds the command."""
        self.log_path = log_dir / f"watcher-{time.monotonic_ns()}.log"
        self._log_file = open(self.log_path, "w")  # noqa: SIM115 - open as long as the process
        popen.setdefault("cwd", REPO)
        self.process = subprocess.Popen(
            wrapper or [sys.executable, "-m", "watcher", *args],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            **popen,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 15.0, count: int = 1) -> bool:
        return wait_until(lambda: self.log.count(text) >= count, timeout)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log_file.close()


@pytest.fixture
def start_watcher(tmp_path: Path):
    """Start watcher daemons for a test and kill any still running at its end."""
    started: list[WatcherProcess] = []

    def start(*args: str, **kwargs) -> WatcherProcess:
        watcher = WatcherProcess(*args, log_dir=tmp_path, **kwargs)
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        watcher.kill()


@pytest.fixture
def tmpfs(tmp_path):
    """An 8 MiB tmpfs mounted under tmp_path; skips the test where mounting is not allowed.

    The unmount is lazy, because a watcher of the test may still hold a file open there.
    """
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)]
    try:
        mounted = subprocess.run(command, check=False, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("mount is not installed")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)
