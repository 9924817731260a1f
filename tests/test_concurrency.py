"""Concurrency with real processes: two watchers racing for a folder, and a fast writer.

The writer test runs a real daemon against a writer that saves every few milliseconds. The
writer saves both atomically (temp name + os.replace) and in place (as torch.save does). It
samples the folder after every save and between the chunks of every in-place write.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, wait_until
from helpers_corpus import corpus
from helpers_hostile import ck

from watcher.lock import LockError, acquire_lock

LOCK = ".ckpt-watcher.lock"
RACE_REPEATS = 10


def _blocked_on_fifo(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/wchan") as file:
            return file.read().strip() in ("fifo_open", "wait_for_partner")
    except OSError:
        return False


class _GatedWatcher:
    """A `python -m watcher` daemon whose start waits until a FIFO is opened for writing."""

    def __init__(self, folder: str, gate: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        command = f": < {shlex.quote(str(gate))}; exec {shlex.quote(sys.executable)} -m watcher "
        command += shlex.quote(folder)
        # `exec` keeps the shell's process id, so self.process.pid is the watcher's id.
        self.process = subprocess.Popen(
            ["sh", "-c", command], cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            return self.process.wait(15)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


def _race(folder: Path, paths: tuple[str, str], tmp: Path, round_index: int) -> tuple:
    """Release two gated watchers at once; return (winner, loser) after the loser exits."""
    gate = tmp / f"gate-{round_index}"
    os.mkfifo(gate)
    watchers = [
        _GatedWatcher(path, gate, tmp / f"watcher-{round_index}-{n}.log")
        for n, path in enumerate(paths)
    ]
    try:
        # Open the gate only once both shells wait on it, so both start in the same instant.
        wait_until(lambda: all(_blocked_on_fifo(w.process.pid) for w in watchers), timeout=5)
        os.close(os.open(gate, os.O_WRONLY))
        assert wait_until(lambda: any(w.process.poll() is not None for w in watchers), 15)
        time.sleep(0.3)  # a second exit would show here
        exited = [w for w in watchers if w.process.poll() is not None]
        assert len(exited) == 1, "both watchers exited" if exited else "neither exited"
        loser = exited[0]
        winner = next(w for w in watchers if w is not loser)
        return winner, loser, watchers
    except BaseException:
        for watcher in watchers:
            watcher.kill()
        raise


def _start_spread_ms(watchers) -> int | None:
    """Return the gap between the two watchers' first log lines, in ms (the log's resolution)."""
    stamps = []
    for watcher in watchers:
        first = watcher.log.split("\n", 1)[0]
        try:
            when = datetime.datetime.strptime(first[:23], "%Y-%m-%d %H:%M:%S,%f")
        except ValueError:
            return None
        stamps.append(when)
    return round(abs((stamps[0] - stamps[1]).total_seconds()) * 1000)


@pytest.mark.parametrize("round_index", range(RACE_REPEATS))
def test_two_watchers_one_runs(tmp_path: Path, round_index: int) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in (1, 2, 3):
        (folder / ck(step)).write_bytes(corpus()["zip"])

    winner, loser, watchers = _race(folder, (str(folder), str(folder)), tmp_path, round_index)
    try:
        print(f"start spread: {_start_spread_ms(watchers)} ms")
        assert loser.process.returncode == 1
        expected = f"another watcher (process {winner.process.pid}) is already watching"
        assert f"{expected} {str(folder)!r}" in loser.log
        assert winner.process.poll() is None
        assert wait_until(lambda: "pass done" in winner.log)
        assert winner.stop() == 0
    finally:
        for watcher in watchers:
            watcher.kill()
    assert set(os.listdir(folder)) == {ck(2), ck(3), LOCK}


def test_two_watchers_two_paths(tmp_path: Path) -> None:
    """A second watcher given another path to the same folder (a symlink) is also refused."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (tmp_path / "alias").symlink_to(folder)
    paths = (str(folder), str(tmp_path / "alias"))

    winner, loser, watchers = _race(folder, paths, tmp_path, 0)
    try:
        assert loser.process.returncode == 1
        assert f"another watcher (process {winner.process.pid})" in loser.log
        assert winner.stop() == 0
    finally:
        for watcher in watchers:
            watcher.kill()


def test_lock_holder_pid_not_stale(tmp_path: Path) -> None:
    """The state a winner is in between flock and writing its pid, held open by this test."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / LOCK).write_text("4194000\n")  # left by a watcher that has exited
    holder = os.open(folder / LOCK, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(LockError) as caught:
                acquire_lock(dir_fd, str(folder))
        finally:
            os.close(dir_fd)
    finally:
        os.close(holder)
    assert "4194000" not in str(caught.value)


# ---------------------------------------------------------------------------
# A fast writer against the daemon

WRITER_SECONDS = 8.0
KEEP_LAST = 2
KEEP_EVERY = 25
CHUNK = 4096


def required(completed: list[int]) -> set[str]:
    """Return the checkpoints that must be present, given the steps completed so far.

    A save counts as completed once the call that put its last byte under its final name has
    returned: os.replace for an atomic save, and the write() of the last chunk (not close())
    for an in-place write, because from then on any reader sees the whole file. While that last
    write() runs, a reader may already see the whole file, so no sample is taken then. The
    writer and the sampler run in this one thread, so the set of completed saves cannot change
    while the folder is listed.
    """
    milestones = {step for step in completed if step % KEEP_EVERY == 0}
    newest = [step for step in completed if step % KEEP_EVERY != 0][-KEEP_LAST:]
    return {ck(step) for step in milestones | set(newest)}


class _Sampler:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.violations: list[tuple[int, list[str]]] = []

    def sample(self, completed: list[int]) -> None:
        need = required(completed)
        present = set(os.listdir(self.folder))
        self.count += 1
        missing = sorted(need - present)
        if missing:
            self.violations.append((completed[-1] if completed else 0, missing))


def _save_atomic(folder: Path, step: int, data: bytes) -> None:
    temp = folder / f".{ck(step)}.tmp"
    temp.write_bytes(data)
    os.replace(temp, folder / ck(step))


def _save_in_place(folder: Path, step: int, data: bytes, sampler, completed) -> None:
    """Write data to the final name in chunks, as torch.save does, sampling between chunks."""
    chunks = [data[start : start + CHUNK] for start in range(0, len(data), CHUNK)]
    with open(folder / ck(step), "wb", buffering=0) as file:
        for chunk in chunks[:-1]:
            file.write(chunk)
            sampler.sample(completed)  # mid-write: this step is not completed yet
        file.write(chunks[-1])
        completed.append(step)
        sampler.sample(completed)  # complete, still open


def test_writer_never_loses_newest(tmp_path: Path, start_watcher) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    watcher = start_watcher(
        str(folder), "--keep-last", str(KEEP_LAST), "--keep-every", str(KEEP_EVERY)
    )
    assert watcher.wait_for_log("pass done")
    small, large = corpus()["zip"], corpus()["zip_large"]
    sampler = _Sampler(folder)
    completed: list[int] = []
    in_place = 0

    deadline = time.monotonic() + WRITER_SECONDS
    while time.monotonic() < deadline:
        step = len(completed) + 1
        if step % 3 == 0:
            _save_in_place(folder, step, large, sampler, completed)
            in_place += 1
        else:
            _save_atomic(folder, step, small)
            completed.append(step)
        sampler.sample(completed)
        time.sleep(0.003)

    final = required(completed)
    converged = wait_until(lambda: set(os.listdir(folder)) - {LOCK} == final, timeout=10)
    assert watcher.stop() == 0
    passes = watcher.log.count("pass done")
    print(
        f"writer: {len(completed)} saves ({in_place} in place), {sampler.count} samples, "
        f"{passes} passes, {len(sampler.violations)} violations"
    )
    assert sampler.violations == [], f"first violations: {sampler.violations[:5]}"
    assert converged, f"left: {sorted(set(os.listdir(folder)) - final)}"
    assert passes > 50, "the daemon hardly ran: the test proved little"
    assert "Traceback" not in watcher.log
