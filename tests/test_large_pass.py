"""A first pass over a large folder: old files are checked just before their deletion, and the
outcome must still be the one the rules give."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import Samples, run_watcher, write_file

import watcher.prune
import watcher.validity.checks
from watcher import cli
from watcher.prune import PRUNING_PREFIX
from watcher.validity.checks import CHANGED, GONE, check_unchanged

COUNT = 700
INVALID_EVERY = 7
MILESTONE_EVERY = 100
LINKED = 50


def ck(step: int) -> str:
    return f"model_v2_step{step}_20250101_000000_s1.pt"


def build(folder: Path, samples: Samples, count: int = COUNT) -> set[str]:
    """Fill the folder and return the names the rules keep (keep_last 2)."""
    for step in range(1, count + 1):
        data = samples.truncated if step % INVALID_EVERY == 0 else samples.valid
        write_file(folder / ck(step), data)
    write_file(folder / ck(count + 1), samples.truncated)  # newest of all, and invalid
    (folder / "best.pt").symlink_to(ck(LINKED))
    invalid = {ck(s) for s in range(1, count + 2) if s % INVALID_EVERY == 0 or s == count + 1}
    milestones = {ck(s) for s in range(MILESTONE_EVERY, count + 1, MILESTONE_EVERY)}
    newest = [s for s in range(count, 0, -1) if s % INVALID_EVERY and s % MILESTONE_EVERY][:2]
    return invalid | milestones | {ck(s) for s in newest} | {ck(LINKED), "best.pt"}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "ckpts"
    path.mkdir()
    return path


def test_large_first_pass_keeps_what_the_rules_keep(folder: Path, samples: Samples) -> None:
    expected = build(folder, samples)
    pruned = COUNT + 1 + 1 - len(expected)

    result = run_watcher(str(folder), "--once", "--keep-every", str(MILESTONE_EVERY))

    assert result.returncode == 0, result.stderr
    assert set(os.listdir(folder)) - {".ckpt-watcher.lock"} == expected
    assert f"pruned {pruned}," in result.stderr
    invalid = COUNT // INVALID_EVERY + 1
    assert f"{invalid} invalid kept" in result.stderr
    assert result.stderr.count("pruned 'model_v2_step") == pruned


def test_large_dry_run_reports_only_valid_files(folder: Path, samples: Samples) -> None:
    expected = build(folder, samples)
    before = set(os.listdir(folder))

    result = run_watcher(str(folder), "--once", "--dry-run", "--keep-every", str(MILESTONE_EVERY))

    assert result.returncode == 0, result.stderr
    assert set(os.listdir(folder)) - {".ckpt-watcher.lock"} == before
    would = set(re.findall(r"would prune '([^']+)'", result.stdout))
    assert would == before - expected
    invalid_steps = [s for s in range(1, COUNT + 2) if s % INVALID_EVERY == 0]
    assert not would & {ck(s) for s in invalid_steps}


def test_check_unchanged_follows_the_scanned_version(folder: Path, samples: Samples) -> None:
    """The check just before a deletion keeps only an invalid file that is still the one scanned."""
    valid, invalid = folder / ck(1), folder / ck(2)
    write_file(valid, samples.valid)
    write_file(invalid, samples.truncated)
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        scanned_valid = os.lstat(valid)
        scanned_invalid = os.lstat(invalid)
        assert check_unchanged(dir_fd, valid.name, scanned_valid) is None
        verdict = check_unchanged(dir_fd, invalid.name, scanned_invalid)
        assert verdict is not None
        assert not verdict.valid
        assert "truncated" in verdict.reason

        # Another file under the name (a new save) is not the scanned version, so it is left.
        replacement = folder / ".new.tmp"
        write_file(replacement, samples.truncated)
        os.replace(replacement, invalid)
        assert check_unchanged(dir_fd, invalid.name, scanned_invalid) is CHANGED

        # A symlink that took the name, and a name that is gone.
        invalid.unlink()
        invalid.symlink_to(valid.name)
        assert check_unchanged(dir_fd, invalid.name, scanned_invalid) is CHANGED
        invalid.unlink()
        assert check_unchanged(dir_fd, invalid.name, scanned_invalid) is GONE
    finally:
        os.close(dir_fd)


def test_file_away_during_check_is_kept(
    folder: Path, samples: Samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalid file moved out of the folder during its check and back before its deletion
    was never checked, so the pass must leave it, whatever the deletion then finds."""
    for step in range(1, 6):
        write_file(folder / ck(step), samples.valid)
    write_file(folder / ck(2), samples.truncated)
    away = folder.parent / "away.pt"
    original_open = watcher.validity.checks._open_for_check

    def open_while_away(dir_fd: int | None, name: str) -> int:
        if name != ck(2):
            return original_open(dir_fd, name)
        os.rename(folder / name, away)
        try:
            return original_open(dir_fd, name)
        finally:
            os.rename(away, folder / name)

    monkeypatch.setattr(watcher.validity.checks, "_open_for_check", open_while_away)
    assert cli.main([str(folder), "--once", "--keep-last", "2"]) == 0

    left = set(os.listdir(folder)) - {".ckpt-watcher.lock"}
    assert left == {ck(2), ck(4), ck(5)}
    assert (folder / ck(2)).read_bytes() == samples.truncated


@pytest.mark.parametrize("spread", [False, True], ids=["one process", "several processes"])
def test_hidden_name_taken_during_pass_survives(
    folder: Path, samples: Samples, monkeypatch: pytest.MonkeyPatch, spread: bool
) -> None:
    """A file created under a hidden name after the scan is never replaced by the deletion."""
    count = 1200 if spread else 5
    for step in range(1, count + 1):
        write_file(folder / ck(step), samples.valid)
    victim = ck(1)
    hidden = folder / (PRUNING_PREFIX + victim)
    original_taken = watcher.prune._Deleter._taken

    def taken_after_the_lookup(deleter, name: str) -> bool:
        taken = original_taken(deleter, name)
        if name == PRUNING_PREFIX + victim:
            hidden.write_bytes(b"user notes")  # created just after the watcher's lookup
        return taken

    monkeypatch.setattr(watcher.prune._Deleter, "_taken", taken_after_the_lookup)
    assert cli.main([str(folder), "--once", "--keep-last", "2"]) == 1

    assert hidden.read_bytes() == b"user notes"
    assert (folder / victim).read_bytes() == samples.valid
    left = set(os.listdir(folder)) - {".ckpt-watcher.lock", hidden.name}
    assert left == {victim, ck(count - 1), ck(count)}


def _targets(folder: Path, names: list[str]) -> list:
    """The deletion targets of `names`, with their current lstat results as the scan's."""
    targets = []
    for index, name in enumerate(names):
        info = os.lstat(folder / name)
        targets.append(
            watcher.prune._Target(
                index,
                name,
                info.st_dev,
                info.st_ino,
                info.st_size,
                info.st_mtime_ns,
                index + 1,
                "series",
                "older than the newest",
            )
        )
    return targets


def test_batch_stopped_part_way_puts_files_back(
    folder: Path, samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop between two unlinks puts the rest of the batch back and logs the deleted file.

    A file replaced since the scan stays as it is."""
    names = [ck(step) for step in range(1, 6)]
    for name in names:
        write_file(folder / name, samples.valid)
    targets = _targets(folder, names)
    replacement = folder / ".new.tmp"
    write_file(replacement, samples.valid)
    os.replace(replacement, folder / names[1])  # a new save since the scan
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)

    def stopping() -> bool:
        """A stop request that arrives once the first file is deleted."""
        return (
            not (folder / names[0]).exists() and not (folder / (PRUNING_PREFIX + names[0])).exists()
        )

    result = watcher.prune.PruneResult()
    deleter = watcher.prune._Deleter(dir_fd, watcher.prune.info_writer(watcher.prune.log), [])
    try:
        with caplog.at_level("INFO", logger="watcher.prune"):
            deleter.delete_batch(targets, result, stopping)
    finally:
        os.close(dir_fd)

    assert set(os.listdir(folder)) == set(names[1:])
    assert (folder / names[1]).stat().st_ino != targets[1].ino
    assert result.gone == [names[0]]
    assert (result.pruned, result.skipped, result.failures) == (1, 1, [])
    messages = [record.getMessage() for record in caplog.records]
    pruned = [message for message in messages if message.startswith("pruned ")]
    size = len(samples.valid)
    assert pruned == [
        f"pruned {names[0]!r} (step 1, series 'series', {size} bytes): older than the newest"
    ]
