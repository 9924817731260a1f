"""Passes over changed names: the same outcome as passes over the whole folder, far less work.

The daemon handles an event by looking only at the names it carries (Pruner.run_changed). These
tests run random folder histories twice, in two folders: one pruned with run_changed() over the
touched names, the other with run() over the whole folder. After every step both folders must hold
the same names.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from conftest import Samples, save_atomically, wait_until, write_file

from watcher import passes
from watcher.config import Policy
from watcher.daemon import MOVE_PAIRING_DELAY, Daemon
from watcher.passes import Pruner, open_folder

SERIES = ("20250101_000000_s1", "20250101_000000_s2")
STEPS = range(1, 40)


def ck(step: int, series: str = SERIES[0]) -> str:
    return f"model_v2_step{step}_{series}.pt"


class Mirror:
    """Two folders that receive the same changes, one pruned per name and one in full."""

    def __init__(self, root: Path, policy_args: dict) -> None:
        self.paths = [root / "by-name", root / "full"]
        self.fds = []
        self.pruners = []
        for path in self.paths:
            path.mkdir()
            self.fds.append(open_folder(path))
            self.pruners.append(Pruner(Policy(directory=path, **policy_args)))
        for pruner, fd in zip(self.pruners, self.fds):
            pruner.run(fd)

    def apply(self, change) -> list[tuple[int, object]]:
        """Make one change in both folders, run both kinds of pass, and return the summaries."""
        summaries = []
        for index, (path, fd, pruner) in enumerate(zip(self.paths, self.fds, self.pruners)):
            names = change(path)
            if index == 0:
                summaries.append(pruner.run_changed(fd, set(names)))
            else:
                summaries.append(pruner.run(fd))
        return summaries

    def listings(self) -> list[list[str]]:
        return [sorted(os.listdir(path)) for path in self.paths]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def random_change(rng: random.Random, samples: Samples):
    """Return a change: a function that applies it to a folder and returns the names it touched."""
    series = rng.choice(SERIES)
    step = rng.choice(STEPS)
    name = ck(step, series)
    kind = rng.choices(
        ["save", "invalid", "complete", "delete", "link", "unlink", "rename", "foreign"],
        weights=[10, 2, 2, 2, 1, 1, 1, 1],
    )[0]
    other = ck(rng.choice(STEPS), series)

    def change(folder: Path) -> list[str]:
        path = folder / name
        if kind == "save":
            save_atomically(path, samples.valid)
        elif kind == "invalid":
            write_file(path, samples.truncated)
        elif kind == "complete":
            # An in-place write that finishes: same name, same inode, now valid.
            with open(path, "ab" if path.exists() else "wb") as file:
                file.truncate(0)
                file.write(samples.valid)
        elif kind == "delete":
            if path.exists() or path.is_symlink():
                path.unlink()
        elif kind == "link":
            link = folder / "best.pt"
            if link.is_symlink():
                link.unlink()
            link.symlink_to(name)
            return ["best.pt"]
        elif kind == "unlink":
            link = folder / "best.pt"
            if link.is_symlink():
                link.unlink()
            return ["best.pt"]
        elif kind == "rename":
            if path.exists():
                os.replace(path, folder / other)
            return [name, other]
        elif kind == "foreign":
            write_file(folder / "notes.txt", b"not a checkpoint")
            return ["notes.txt"]
        return [name]

    return f"{kind} {name}", change


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "policy_args",
    [{"keep_last": 2}, {"keep_last": 1, "keep_every": 10}, {"keep_last": 3, "milestones": (7,)}],
    ids=["keep2", "keep1-every10", "keep3-listed"],
)
def test_changed_names_match_full_passes(
    tmp_path: Path, samples: Samples, seed: int, policy_args: dict, monkeypatch
) -> None:
    # A link target stays protected for a while by its inode, and the two folders reuse the
    # inodes of deleted files differently, so the grace would protect different new files.
    monkeypatch.setattr(passes, "LINK_GRACE", 0.0)
    rng = random.Random(seed)
    mirror = Mirror(tmp_path, policy_args)
    history = []
    try:
        for _ in range(120):
            label, change = random_change(rng, samples)
            history.append(label)
            by_name, full = mirror.apply(change)
            by_name_listing, full_listing = mirror.listings()
            assert by_name_listing == full_listing, "after: " + "; ".join(history[-8:])
            if by_name is not None:
                assert by_name.pruned == full.pruned, "after: " + "; ".join(history[-8:])
    finally:
        mirror.close()


@pytest.fixture
def pruned(tmp_path: Path, samples: Samples):
    """Yield (folder, handle, pruner) after one full pass over steps 1 and 2."""
    folder = tmp_path / "f"
    folder.mkdir()
    for step in (1, 2):
        write_file(folder / ck(step), samples.valid)
    fd = open_folder(folder)
    pruner = Pruner(Policy(directory=folder, keep_last=2))
    pruner.run(fd)
    yield folder, fd, pruner
    os.close(fd)


def test_unrelated_name_changes_nothing(pruned) -> None:
    folder, fd, pruner = pruned
    write_file(folder / "notes.txt", b"x")

    assert pruner.run_changed(fd, {"notes.txt"}) is None


def test_named_pass_reports_its_scope(pruned, samples: Samples) -> None:
    folder, fd, pruner = pruned
    save_atomically(folder / ck(3), samples.valid)

    summary = pruner.run_changed(fd, {ck(3)})

    assert summary.names == 1
    assert summary.pruned == 1
    assert "(over 1 changed name)" in summary.describe()
    assert sorted(os.listdir(folder)) == [ck(2), ck(3)]


def test_named_pass_without_earlier_pass_lists_folder(tmp_path: Path, samples: Samples) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    for step in (1, 2, 3):
        write_file(folder / ck(step), samples.valid)
    fd = open_folder(folder)
    try:
        summary = Pruner(Policy(directory=folder, keep_last=2)).run_changed(fd, {ck(3)})
    finally:
        os.close(fd)
    assert summary.names is None
    assert sorted(os.listdir(folder)) == [ck(2), ck(3)]


def test_daemon_save_runs_named_pass(tmp_path: Path, samples: Samples, start_watcher) -> None:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    residents = [ck(step * 1000, SERIES[1]) for step in range(1, 301)]
    for name in residents:
        write_file(folder / name, samples.valid)
    for step in (1, 2):
        write_file(folder / ck(step), samples.valid)
    watcher = start_watcher(str(folder), "--keep-every", "1000")
    assert watcher.wait_for_log("pass done")

    for step in (3, 4, 5):
        save_atomically(folder / ck(step), samples.valid)
        assert wait_until(lambda step=step: not (folder / ck(step - 2)).exists())

    assert watcher.stop() == 0
    assert "changed name" in watcher.log
    assert sorted(os.listdir(folder)) == sorted(residents + [ck(4), ck(5), ".ckpt-watcher.lock"])


def test_daemon_link_made_later_protects_its_target(
    tmp_path: Path, samples: Samples, start_watcher
) -> None:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (1, 2):
        write_file(folder / ck(step), samples.valid)
    watcher = start_watcher(str(folder))
    assert watcher.wait_for_log("pass done")

    (folder / "best.pt").symlink_to(ck(1))
    assert watcher.wait_for_log("pass done", count=2)
    for step in (3, 4):
        save_atomically(folder / ck(step), samples.valid)
    assert wait_until(lambda: not (folder / ck(2)).exists())

    assert watcher.stop() == 0
    assert (folder / ck(1)).exists()


def test_move_pairing_delay_is_shortened(tmp_path: Path) -> None:
    from watchdog.observers import inotify_move_event_grouper as grouper

    # Without this attribute the daemon waits watchdog's default for half of every rename.
    # This assert fails if a watchdog release drops or renames it.
    assert isinstance(grouper.InotifyMoveEventGrouper.delay, (int, float))

    Daemon(Policy(directory=tmp_path), lambda: Policy(directory=tmp_path))

    assert grouper.InotifyMoveEventGrouper.delay == MOVE_PAIRING_DELAY


def test_daemon_never_sees_writes_or_opens(tmp_path: Path, samples: Samples, start_watcher) -> None:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    watcher = start_watcher(str(folder), "-v")
    assert watcher.wait_for_log("pass done")

    with open(folder / ck(1), "wb") as file:
        for start in range(0, len(samples.valid), 64):
            file.write(samples.valid[start : start + 64])
            file.flush()
    for step in (2, 3):
        save_atomically(folder / ck(step), samples.valid)
    assert wait_until(lambda: not (folder / ck(1)).exists())

    assert watcher.stop() == 0
    assert "event closed" in watcher.log
    assert "event modified" not in watcher.log
    assert "event opened" not in watcher.log


def test_named_pass_sees_rewrite_in_place(pruned, samples: Samples) -> None:
    folder, fd, pruner = pruned
    save_atomically(folder / ck(3), samples.valid)
    pruner.run_changed(fd, {ck(3)})
    # Step 3 is being rewritten in place: no event names it until its writer closes it.
    write_file(folder / ck(3), samples.truncated)
    save_atomically(folder / ck(4), samples.valid)

    summary = pruner.run_changed(fd, {ck(4)})

    assert summary.pruned == 0
    assert sorted(os.listdir(folder)) == [ck(2), ck(3), ck(4)]


def test_daemon_keeps_newest_during_rewrite(
    tmp_path: Path, samples: Samples, start_watcher
) -> None:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    watcher = start_watcher(str(folder))
    assert watcher.wait_for_log("pass done")
    for step in (1, 2, 3):
        save_atomically(folder / ck(step), samples.valid)
    assert wait_until(lambda: not (folder / ck(1)).exists())

    with open(folder / ck(3), "wb") as writer:
        writer.write(samples.valid[:100])
        writer.flush()
        passes = watcher.log.count("pass done")
        save_atomically(folder / ck(4), samples.valid)
        assert watcher.wait_for_log("pass done", count=passes + 1)
        assert (folder / ck(2)).exists(), "a half-rewritten file pushed out a valid one"
        writer.write(samples.valid[100:])
    assert wait_until(lambda: not (folder / ck(2)).exists())

    assert watcher.stop() == 0
    assert sorted(os.listdir(folder)) == sorted([ck(3), ck(4), ".ckpt-watcher.lock"])
