"""Crash tests: SIGKILL of the trainer and of the watcher, and saves that fail, with real processes.

CI runs a few trials of each kind here, and bench/crash_trainer.py and bench/crash_watcher.py run
the same trials in the hundreds. Tests that mount a tmpfs need root and skip without it.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers_crash import PYTHON, LoggedProcess, run_watcher_once, start_watcher
from helpers_crash_trainer import (
    NAME_REGEX,
    SAVED_REGEX,
    TINY_OPTIONS,
    TrainerCrashChain,
    _Listing,
    run_trainer_crashes,
)
from helpers_crash_watcher import FolderSpec, WatcherCrashTrials, run_watcher_crashes

from watcher.scan import LOCK_NAME
from watcher.validity import check_file

CI_TRAINER_KILLS = 10
CI_WATCHER_TRIALS = 3
CI_FOLDER = FolderSpec(series=3, per_series=1000)
START_TIMEOUT = 60.0


def trainer_command(log_dir: Path, *extra: str) -> list[str]:
    return [
        PYTHON, "-m", "trainer", *TINY_OPTIONS, "--save-every-steps", "1", "--log-every", "1",
        "--log-dir", str(log_dir), *extra,
    ]  # fmt: skip


def checkpoint_steps(folder: Path) -> dict[int, str]:
    return {
        int(found[1]): name
        for name in os.listdir(folder)
        if (found := NAME_REGEX.fullmatch(name)) is not None
    }


def temp_names(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if ".tmp" in name]


def wait_until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def problem_lines(log_lines: list[str]) -> list[str]:
    markers = (" ERROR ", "Traceback", "invalid, kept", "pruned '.")
    return [line for line in log_lines if any(marker in line for marker in markers)]


# SIGKILL of the trainer


def test_trainer_sigkill_trials(tmp_path):
    report = run_trainer_crashes(tmp_path / "chain", CI_TRAINER_KILLS, seed=1)
    assert report.problems == []
    assert len(report.trials) == CI_TRAINER_KILLS
    assert report.resumes_checked == CI_TRAINER_KILLS + 1
    assert report.watcher_counted == report.checkpoint_files_at_end
    assert report.validity_checks >= report.checkpoint_files_at_end


def test_trainer_check_flags_invalid_name(tmp_path):
    chain = TrainerCrashChain(tmp_path)
    chain.folder.mkdir(parents=True)
    (chain.folder / "model_v2_step5_20260101_000000_s0.pt").write_bytes(b"PK\x03\x04 half")
    chain._dir_fd = os.open(chain.folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        chain._check_names(_Listing(os.listdir(chain.folder)))
    finally:
        os.close(chain._dir_fd)
    assert len(chain.report.problems) == 1
    assert "invalid under a checkpoint name" in chain.report.problems[0]


# SIGKILL of the watcher


def test_watcher_sigkill_trials(tmp_path):
    report = run_watcher_crashes(tmp_path / "trials", CI_FOLDER, CI_WATCHER_TRIALS, seed=1)
    assert report.problems == []
    assert report.trials == CI_WATCHER_TRIALS
    assert report.phase_counts()["during deletions"] >= 1


def test_watcher_trials_catch_overpruning(tmp_path):
    """A watcher that keeps too little must show up as lost files and a different final set."""
    spec = FolderSpec(series=2, per_series=300)
    options = ["--keep-last", "1", "--keep-every", str(spec.keep_every)]
    trials = WatcherCrashTrials(tmp_path / "trials", spec, options=options)
    trials.kill_fraction = 1.0  # kill after the pass, so the over-pruning has happened
    report = trials.run(1)
    assert any("deleted files the policy keeps" in text for text in report.problems)
    assert any("final folder differs from --once" in text for text in report.problems)


# Saves that fail while the watcher runs


def fill_until(path: Path, done, timeout: float = 60.0) -> None:
    """Append 4 KiB blocks to `path` until `done()` returns true, retrying while the disk is full.

    Retrying keeps the disk full while the watcher frees space by pruning.
    """
    block = b"\0" * 4096
    deadline = time.monotonic() + timeout
    with open(path, "ab", buffering=0) as filler:
        while not done():
            assert time.monotonic() < deadline, f"filling {path} timed out after {timeout} s"
            try:
                filler.write(block)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                time.sleep(0.001)


def test_disk_full_mid_run_watcher(tmp_path, tmpfs):
    log_dir = tmpfs / "run"
    folder = log_dir / "checkpoints"
    folder.mkdir(parents=True)
    watcher = start_watcher(folder, ["--keep-last", "2"], tmp_path / "watcher.log")
    assert watcher.wait_for_line("watching", START_TIMEOUT)
    trainer = LoggedProcess(
        trainer_command(log_dir, "--steps", "1000000"), tmp_path / "trainer.log"
    )
    assert trainer.wait_for_line("at step 5 in", START_TIMEOUT), trainer.tail.lines[-5:]

    fill_until(tmpfs / "filler", lambda: trainer.process.poll() is not None)
    status = trainer.kill()
    assert status == 1
    assert any("No space left on device" in line for line in trainer.tail.lines)

    saved = [int(found[1]) for line in trainer.tail.lines if (found := SAVED_REGEX.search(line))]
    newest_two = set(sorted(saved)[-2:])
    assert wait_until(lambda: set(checkpoint_steps(folder)) == newest_two), sorted(
        checkpoint_steps(folder)
    )
    assert temp_names(folder) == []
    for step, name in checkpoint_steps(folder).items():
        assert check_file(None, str(folder / name)).valid, name
        assert torch.load(folder / name, weights_only=True)["step"] == step
    assert watcher.process.poll() is None
    assert watcher.stop() == 0
    assert problem_lines(watcher.tail.lines) == []

    (tmpfs / "filler").unlink()
    resumed = subprocess.run(
        trainer_command(log_dir, "--resume", "--steps", str(max(saved) + 2)),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"resuming run \S+ from \S+ at step {max(saved)}\n", resumed.stderr)


def test_file_size_limit_watcher(tmp_path):
    log_dir = tmp_path / "run"
    folder = log_dir / "checkpoints"
    folder.mkdir(parents=True)
    watcher = start_watcher(folder, ["--keep-last", "2", "-v"], tmp_path / "watcher.log")
    assert watcher.wait_for_line("watching", START_TIMEOUT)
    first = subprocess.run(
        trainer_command(log_dir, "--steps", "6"),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert wait_until(lambda: set(checkpoint_steps(folder)) == {5, 6})
    before = {name: (folder / name).read_bytes() for name in checkpoint_steps(folder).values()}
    limit = min(len(data) for data in before.values()) // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = subprocess.run(
        trainer_command(log_dir, "--resume", "--steps", "12"),
        capture_output=True, text=True, timeout=120, check=False, preexec_fn=limit_file_size,
    )  # fmt: skip
    time.sleep(0.5)  # let the watcher handle the temp file's events
    assert watcher.stop() == 0

    assert failed.returncode == 1, failed.stderr
    assert "File too large" in failed.stderr
    assert temp_names(folder) == []
    assert {name: (folder / name).read_bytes() for name in checkpoint_steps(folder).values()} == (
        before
    )
    temp_events = [
        line
        for line in watcher.tail.lines
        if "event created" in line and "/.model_v2_step7_" in line
    ]
    assert len(temp_events) == 1, "the watcher never saw the partial temp file"
    assert problem_lines(watcher.tail.lines) == []


def fill_disk(mount_point: Path) -> None:
    fill_until(mount_point / "filler", lambda: os.statvfs(mount_point).f_bavail == 0)


@pytest.mark.parametrize(
    "lock",
    [
        pytest.param("stale", id="stale-lock"),
        pytest.param("none", id="no-lock-file"),
    ],
)
def test_watcher_once_full_disk(tmp_path, tmpfs, samples, lock):
    folder = tmpfs / "checkpoints"
    folder.mkdir()
    for step in range(1, 6):
        (folder / f"model_v2_step{step}_20260101_000000_s0.pt").write_bytes(samples.valid)
    if lock == "stale":
        killed = start_watcher(folder, ["--keep-last", "5"], tmp_path / "killed.log")
        assert killed.wait_for_line("pass done", START_TIMEOUT)
        killed.kill()
        assert (folder / LOCK_NAME).read_text().strip() == str(killed.pid)
    fill_disk(tmpfs)
    assert os.statvfs(tmpfs).f_bavail == 0

    result = run_watcher_once(folder, ["--keep-last", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(checkpoint_steps(folder)) == [4, 5]
