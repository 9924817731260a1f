"""Hostile and odd input for `python -m watcher ... --once`, run as a real process.

Each case states the exit status, a fragment of the message and what is left on disk. Races are
forced with a slow checkpoint: the watcher checks every checkpoint before it deletes anything,
and checking helpers_corpus.slow_checkpoint() takes a few hundred milliseconds, so a test can
act after the scan and before the first deletion (helpers_hostile.run_during_check).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run_watcher
from helpers_corpus import corpus, slow_checkpoint
from helpers_hostile import (
    NOBODY,
    can_bind_mount,
    can_set_immutable,
    ck,
    immutable,
    public_temp_dir,
    read_only_bind,
    run_during_check,
    run_unprivileged,
    start_swapper,
)

import watcher.passes
import watcher.prune
from watcher.config import Policy
from watcher.passes import Pruner, open_folder

LOCK = ".ckpt-watcher.lock"
STEPS = (1, 2, 3, 4)
"""Every folder starts with these valid checkpoints; keep_last 2 prunes steps 1 and 2."""
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
MOUNTS = pytest.mark.skipif(not can_bind_mount(), reason="needs root and mount --bind")


def valid() -> bytes:
    return corpus()["zip"]


def fill(folder: Path, steps=STEPS) -> None:
    folder.mkdir(exist_ok=True)
    for step in steps:
        (folder / ck(step)).write_bytes(valid())


def names(folder: Path) -> set[str]:
    return set(os.listdir(folder))


def ckpts(*steps: int) -> set[str]:
    return {ck(step) for step in steps}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoints"
    fill(path)
    return path


# ---------------------------------------------------------------------------
# Configuration and arguments: exit 2, a message naming the value, nothing touched


def _case(case):
    """Turn a table row (name first) into a pytest.param whose id is the name."""
    if hasattr(case, "marks"):  # already a pytest.param, with marks
        name, *values = case.values
        return pytest.param(*values, id=name, marks=case.marks)
    return pytest.param(*case[1:], id=case[0])


# Each case: name, YAML text, and fragments that must all be in the message. The fragments are
# the key and the rejected value, so that rewording a message does not break the table.
CONFIG_CASES = [
    ("list", "- 1\n- 2\n", ("must be a mapping", "list")),
    ("scalar", "just text\n", ("must be a mapping", "str")),
    ("keep_last text", "keep_last: three\n", ("keep_last", "'three'")),
    ("keep_last bool", "keep_last: true\n", ("keep_last", "True")),
    ("keep_last float", "keep_last: 2.5\n", ("keep_last", "2.5")),
    ("keep_last zero", "keep_last: 0\n", ("keep_last", ">= 1")),
    ("keep_every bool", "keep_every: false\n", ("keep_every", "False")),
    ("keep_every zero", "keep_every: 0\n", ("keep_every", ">= 1")),
    ("milestones scalar", "milestones: 100\n", ("milestones", "100")),
    ("milestones bool", "milestones: [true]\n", ("milestones", "True")),
    ("milestones text", "milestones: ['5']\n", ("milestones", "'5'")),
    ("milestones negative", "milestones: [-1]\n", ("milestones", "-1")),
    ("milestones nested", "milestones: [[1, 2]]\n", ("milestones", "[1, 2]")),
    ("dry_run number", "dry_run: 1\n", ("dry_run", "true or false")),
    ("dry_run quoted", "dry_run: 'no'\n", ("dry_run", "'no'")),
    ("polling text", "polling: auto\n", ("polling", "'auto'")),
    ("rescan bool", "rescan_interval: true\n", ("rescan_interval", "True")),
    ("rescan infinite", "rescan_interval: .inf\n", ("rescan_interval", "inf")),
    ("rescan nan", "rescan_interval: .nan\n", ("rescan_interval", "nan")),
    ("pattern number", "pattern: 5\n", ("pattern", "5")),
    ("pattern no star", "pattern: model.pt\n", ("'model.pt'", "'*'")),
    ("pattern separator", "pattern: sub/model_*.pt\n", ("'sub/model_*.pt'", "separator")),
    ("pattern parent", "pattern: ../model_*.pt\n", ("'../model_*.pt'",)),
    ("pattern dots", "pattern: model..*.pt\n", ("'model..*.pt'", "'..'")),
    ("pattern star in class", "pattern: 'm[*]_*.pt'\n", ("'m[*]_*.pt'", "[...]")),
    ("unknown key", "keep: 3\n", ("unknown key", "'keep'")),
    ("invalid yaml", "keep_last: [\n", ("not valid YAML", "line")),
    ("duplicate key", "keep_last: 1\nkeep_last: 3\n", ("'keep_last'", "line 2")),
    pytest.param(
        "unhashable key",
        "? [a]\n: 1\n",
        ("not valid YAML",),
    ),
]


@pytest.mark.parametrize(("text", "fragments"), [_case(c) for c in CONFIG_CASES])
def test_config_rejected(folder: Path, tmp_path: Path, text: str, fragments: tuple) -> None:
    config = tmp_path / "watcher.yaml"
    config.write_text(text)
    before = names(folder)

    result = run_watcher(str(folder), "--once", "--config", str(config))

    assert result.returncode == 2, result.stderr
    message = result.stderr.splitlines()[-1]
    for fragment in fragments:
        assert fragment in message
    assert "Traceback" not in result.stderr
    assert names(folder) == before, "a rejected config touched the folder"


def test_config_directory_wrong_type(folder: Path, tmp_path: Path) -> None:
    config = tmp_path / "watcher.yaml"
    config.write_text("directory: 5\n")

    result = run_watcher("--once", "--config", str(config))

    assert result.returncode == 2
    assert "directory must be a non-empty path string, not 5" in result.stderr


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [("binary", "cannot be read"), ("folder", "cannot be read"), ("missing", "not found")],
)
def test_config_file_unusable(folder: Path, tmp_path: Path, kind: str, fragment: str) -> None:
    config = tmp_path / "watcher.yaml"
    if kind == "binary":
        config.write_bytes(b"\xff\xfe\x00keep_last: 1\n")
    elif kind == "folder":
        config.mkdir()
    before = names(folder)

    result = run_watcher(str(folder), "--once", "--config", str(config))

    assert result.returncode == 2
    assert fragment in result.stderr
    assert names(folder) == before


ARGUMENT_CASES = [
    ("keep-last zero", ["--keep-last", "0"], ("--keep-last", ">= 1")),
    ("keep-last negative", ["--keep-last", "-1"], ("--keep-last", ">= 1")),
    ("keep-last text", ["--keep-last", "abc"], ("--keep-last", "'abc'")),
    ("keep-every zero", ["--keep-every", "0"], ("--keep-every", ">= 1")),
    ("milestones text", ["--milestones", "1,x"], ("--milestones", "'x'")),
    ("milestones negative", ["--milestones=-5"], ("--milestones", "'-5'")),
    ("pattern no star", ["--pattern", "model.pt"], ("--pattern", "'model.pt'")),
    ("pattern separator", ["--pattern", "a/*"], ("--pattern", "'a/*'")),
    ("rescan nan", ["--rescan-interval", "nan"], ("--rescan-interval", "nan")),
]


@pytest.mark.parametrize(("args", "fragments"), [_case(c) for c in ARGUMENT_CASES])
def test_argument_rejected(folder: Path, args: list[str], fragments: tuple) -> None:
    before = names(folder)

    result = run_watcher(str(folder), "--once", *args)

    assert result.returncode == 2, result.stderr
    message = result.stderr.splitlines()[-1]
    for fragment in fragments:
        assert fragment in message
    assert names(folder) == before


def test_empty_directory_argument() -> None:
    result = run_watcher("", "--once")

    assert result.returncode == 2
    assert "directory must be a non-empty path string" in result.stderr


@pytest.mark.parametrize(
    ("text", "left"),
    [
        ("", ckpts(3, 4)),
        ("keep_last: 1000000000000000000000000000000\n", ckpts(*STEPS)),
        ("keep_last: 0x3\n", ckpts(2, 3, 4)),
    ],
    ids=["empty file", "huge keep_last", "hex keep_last"],
)
def test_config_accepted(folder: Path, tmp_path: Path, text: str, left: set[str]) -> None:
    config = tmp_path / "watcher.yaml"
    config.write_text(text)

    result = run_watcher(str(folder), "--once", "--config", str(config))

    assert result.returncode == 0, result.stderr
    assert names(folder) - {LOCK} == left


# ---------------------------------------------------------------------------
# The folder argument


def test_dir_is_file(tmp_path: Path) -> None:
    path = tmp_path / ck(1)
    path.write_bytes(valid())

    result = run_watcher(str(path), "--once")

    assert result.returncode == 1
    assert "is not a folder" in result.stderr
    assert path.read_bytes() == valid()


def test_dir_missing(tmp_path: Path) -> None:
    result = run_watcher(str(tmp_path / "absent"), "--once")

    assert result.returncode == 1
    assert "not found" in result.stderr
    assert not (tmp_path / "absent").exists()


def test_dir_link_to_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(valid())
    (tmp_path / "link").symlink_to("file")

    result = run_watcher(str(tmp_path / "link"), "--once")

    assert result.returncode == 1
    assert "is not a folder" in result.stderr


def test_dir_through_link(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(folder)

    result = run_watcher(str(tmp_path / "link"), "--once")

    assert result.returncode == 0, result.stderr
    assert names(folder) == ckpts(3, 4) | {LOCK}
    assert (tmp_path / "link").is_symlink()


ODD_NAMES = ["dir with space", "new\nline", "ünïcode", "bad-\udcff-utf8"]


@pytest.mark.parametrize("odd", ODD_NAMES, ids=["space", "newline", "unicode", "not utf-8"])
def test_odd_folder_and_names(tmp_path: Path, odd: str) -> None:
    folder = tmp_path / odd
    folder.mkdir()
    names_made = [f"model_v2_step{step}_{odd}_s1.pt" for step in STEPS]
    for name in names_made:
        (folder / name).write_bytes(valid())

    dry = run_watcher(str(folder), "--once", "--dry-run")
    result = run_watcher(str(folder), "--once", "--log-format", "json")

    assert dry.returncode == 0, dry.stderr
    assert len(dry.stdout.splitlines()) == 2, "each would-prune line must stay one line"
    assert result.returncode == 0, result.stderr
    assert names(folder) == set(names_made[2:]) | {LOCK}
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert sum(r["message"].startswith("pruned ") for r in records) == 2


def test_odd_names_not_checkpoints(folder: Path, monkeypatch) -> None:
    """Digits that are not ASCII, and special files with checkpoint names, are left alone."""
    arabic = "model_v2_step٣_r_s1.pt"
    fullwidth = "model_v2_step５_r_s1.pt"
    for name in (arabic, fullwidth):
        (folder / name).write_bytes(valid())
    os.mkfifo(folder / ck(0, seed=1))
    monkeypatch.chdir(folder)  # a socket path is limited to 107 bytes, so bind a short one
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(ck(0, seed=2))
    try:
        result = run_watcher(str(folder), "--once", "--keep-last", "1", timeout=20)
    finally:
        sock.close()

    assert result.returncode == 0, result.stderr
    left = names(folder)
    assert {arabic, fullwidth, ck(0, seed=1), ck(0, seed=2)} <= left
    assert left & ckpts(*STEPS) == ckpts(4)


# ---------------------------------------------------------------------------
# The lock file as an attack surface


def test_lock_symlink_not_followed(folder: Path, tmp_path: Path) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (folder / LOCK).symlink_to(outside)

    result = run_watcher(str(folder), "--once")

    assert result.returncode == 1
    assert "cannot create the lock file" in result.stderr
    assert outside.read_text() == "keep me"
    assert names(folder) >= ckpts(*STEPS)


def test_lock_is_folder(folder: Path) -> None:
    (folder / LOCK).mkdir()

    result = run_watcher(str(folder), "--once")

    assert result.returncode == 1
    assert "cannot create the lock file" in result.stderr
    assert names(folder) >= ckpts(*STEPS)


def test_lock_is_fifo(folder: Path) -> None:
    """A FIFO under the lock name: no traceback, and a folder either untouched or pruned."""
    os.mkfifo(folder / LOCK)

    result = run_watcher(str(folder), "--once", timeout=20)

    assert "Traceback" not in result.stderr
    expected = ckpts(3, 4) if result.returncode == 0 else ckpts(*STEPS)
    assert names(folder) - {LOCK} == expected, f"exit status {result.returncode}"


def test_lock_hard_link_untouched(folder: Path, tmp_path: Path) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    outside.chmod(0o644)
    os.link(outside, folder / LOCK)

    run_watcher(str(folder), "--once")

    assert stat.S_IMODE(outside.stat().st_mode) == 0o644
    assert outside.read_text() == "keep me"


@MOUNTS
def test_full_disk_runs_without_lock(tmp_path: Path) -> None:
    """With no inode left for the lock file, the pass still runs: pruning is what frees space."""
    folder = tmp_path / "full"
    folder.mkdir()
    # One inode for the root of the mount and one per checkpoint: none left for the lock file.
    options = f"size=1m,nr_inodes={1 + len(STEPS)}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
    try:
        fill(folder)
        result = run_watcher(str(folder), "--once")
        left = names(folder)
    finally:
        subprocess.run(["umount", str(folder)], check=True)

    assert result.returncode == 0, result.stderr
    assert "running without the lock" in result.stderr
    assert left == ckpts(3, 4)


# ---------------------------------------------------------------------------
# Permissions: the watcher as uid 65534 (nobody), without capabilities


@pytest.fixture
def shared():
    if os.geteuid() != 0:
        pytest.skip("needs root to run the watcher as another uid")
    with public_temp_dir() as path:
        yield path


def test_unprivileged_launcher_drops_root(shared: Path) -> None:
    result = run_unprivileged(str(shared / "absent"), "--once")

    assert result.returncode == 1, result.stderr
    assert "capabilities left" not in result.stderr


def test_folder_unreadable(shared: Path) -> None:
    folder = shared / "private"
    fill(folder)
    folder.chmod(0o700)

    result = run_unprivileged(str(folder), "--once")

    assert result.returncode == 1
    assert f"cannot open checkpoint folder {str(folder)!r}: Permission denied" in result.stderr
    assert names(folder) == ckpts(*STEPS)


def test_folder_read_only_for_uid(shared: Path) -> None:
    folder = shared / "readonly"
    fill(folder)
    folder.chmod(0o755)

    result = run_unprivileged(str(folder), "--once")

    assert result.returncode == 1
    assert "cannot create the lock file" in result.stderr
    assert names(folder) == ckpts(*STEPS)


def test_lock_refusal_reason(shared: Path) -> None:
    folder = shared / "readonly"
    fill(folder)
    folder.chmod(0o755)

    result = run_unprivileged(str(folder), "--once")

    assert "Permission denied" in result.stderr


def test_folder_read_only_dry_run(shared: Path) -> None:
    folder = shared / "readonly"
    fill(folder)
    folder.chmod(0o755)

    result = run_unprivileged(str(folder), "--once", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    assert names(folder) == ckpts(*STEPS)


def test_folder_listable_not_searchable(shared: Path) -> None:
    folder = shared / "list-only"
    fill(folder)
    folder.chmod(0o744)

    result = run_unprivileged(str(folder), "--once")

    assert result.returncode == 1
    assert "cannot create the lock file" in result.stderr
    assert names(folder) == ckpts(*STEPS)


def test_dry_run_listable_not_searchable(shared: Path) -> None:
    folder = shared / "list-only"
    fill(folder)
    folder.chmod(0o744)

    result = run_unprivileged(str(folder), "--once", "--dry-run")

    assert names(folder) == ckpts(*STEPS)
    assert "Traceback" not in result.stderr


def test_sticky_folder_refuses_deletion(shared: Path) -> None:
    """In a sticky folder the uid may delete only its own files: one deletion fails, one works."""
    folder = shared / "sticky"
    fill(folder)
    folder.chmod(0o1777)
    for step in (2, 3, 4):
        os.chown(folder / ck(step), NOBODY, NOBODY)

    result = run_unprivileged(str(folder), "--once")

    assert result.returncode == 1
    assert f"failed to prune {ck(1)!r}" in result.stderr
    assert "Operation not permitted" in result.stderr
    assert "1 failed to delete" in result.stderr
    assert names(folder) == ckpts(1, 3, 4) | {LOCK}


def test_unreadable_checkpoint_kept(shared: Path) -> None:
    folder = shared / "mixed"
    fill(folder)
    folder.chmod(0o777)
    (folder / ck(4)).chmod(0o600)

    result = run_unprivileged(str(folder), "--once")

    assert result.returncode == 0, result.stderr
    assert f"{ck(4)!r} (unreadable: Permission denied)" in result.stderr
    assert names(folder) == ckpts(2, 3, 4) | {LOCK}


# ---------------------------------------------------------------------------
# Deletion refused by the filesystem


@MOUNTS
def test_read_only_mount_once(folder: Path) -> None:
    with read_only_bind(folder):
        result = run_watcher(str(folder), "--once")
        left = names(folder)

    assert result.returncode == 1
    assert "cannot create the lock file" in result.stderr
    assert "Read-only file system" in result.stderr
    assert left == ckpts(*STEPS)


@MOUNTS
def test_read_only_mount_dry_run(folder: Path) -> None:
    with read_only_bind(folder):
        result = run_watcher(str(folder), "--once", "--dry-run")
        left = names(folder)

    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    assert left == ckpts(*STEPS)


@MOUNTS
def test_read_only_mount_in_process(folder: Path) -> None:
    with read_only_bind(folder):
        dir_fd = open_folder(folder)
        try:
            summary = Pruner(Policy(directory=folder)).run(dir_fd)
        finally:
            os.close(dir_fd)
        left = names(folder)

    assert summary.failed == 2
    assert summary.pruned == 0
    assert left == ckpts(*STEPS)


@ROOT_ONLY
def test_immutable_file_refused(folder: Path) -> None:
    if not can_set_immutable(folder):
        pytest.skip("the filesystem has no immutable attribute")
    with immutable(folder / ck(1)):
        result = run_watcher(str(folder), "--once")
        left = names(folder)

    assert result.returncode == 1
    assert f"failed to prune {ck(1)!r}" in result.stderr
    assert "Operation not permitted" in result.stderr
    assert left == ckpts(1, 3, 4) | {LOCK}, "the pass must go on after a failed deletion"


# ---------------------------------------------------------------------------
# Changes between the scan and the deletion, forced with the slow checkpoint


@pytest.fixture
def slow_folder(tmp_path: Path) -> Path:
    """The standard folder plus the slow checkpoint as its newest step; keep_last 2 prunes 1-3.

    On tmpfs, which lists a folder in reverse creation order, the slow checkpoint is created
    first so that it is checked last: every other file is checked before the test acts.
    """
    path = tmp_path / "checkpoints"
    path.mkdir()
    (path / ck(1000)).write_bytes(slow_checkpoint())
    fill(path)
    return path


@pytest.fixture
def slow_folder_tmpfs():
    """slow_folder on tmpfs, where the slow checkpoint is sure to be the last one checked."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no tmpfs at /dev/shm")
    root = Path(tempfile.mkdtemp(prefix="ckpt-hostile-", dir="/dev/shm"))
    path = root / "checkpoints"
    path.mkdir()
    (path / ck(1000)).write_bytes(slow_checkpoint())
    fill(path)
    try:
        assert os.listdir(path)[-1] == ck(1000), "tmpfs did not list in reverse creation order"
        yield path
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_file_vanishes_before_deletion(slow_folder_tmpfs: Path) -> None:
    folder = slow_folder_tmpfs
    timed = run_during_check([str(folder), "--once"], folder / ck(1000), (folder / ck(1)).unlink)

    assert timed.hook_during_check
    assert timed.result.returncode == 0, timed.result.stderr
    assert f"already gone, nothing to prune: {ck(1)!r}" in timed.result.stderr
    assert "1 changed or gone since the scan" in timed.result.stderr
    assert names(folder) == ckpts(4, 1000) | {LOCK}


def test_link_swapped_in_before_deletion(slow_folder_tmpfs: Path, tmp_path: Path) -> None:
    folder = slow_folder_tmpfs
    victim = tmp_path / "victim.pt"
    victim.write_bytes(valid())
    staged = folder / ".staged-link"

    def swap() -> None:
        staged.symlink_to(victim)
        os.replace(staged, folder / ck(2))

    timed = run_during_check([str(folder), "--once"], folder / ck(1000), swap)

    assert timed.hook_during_check
    assert timed.result.returncode == 0, timed.result.stderr
    assert f"{ck(2)!r} changed since the scan" in timed.result.stderr
    assert (folder / ck(2)).is_symlink()
    assert victim.read_bytes() == valid()
    assert names(folder) == ckpts(2, 4, 1000) | {LOCK}


def test_file_replaced_before_deletion(slow_folder_tmpfs: Path) -> None:
    """A new save under a name the plan prunes (a new inode) is left for the next pass."""
    folder = slow_folder_tmpfs
    staged = folder / ".staged-file"

    def resave() -> None:
        staged.write_bytes(corpus()["zip_large"])
        os.replace(staged, folder / ck(2))

    timed = run_during_check([str(folder), "--once"], folder / ck(1000), resave)

    assert timed.hook_during_check
    assert timed.result.returncode == 0, timed.result.stderr
    assert f"{ck(2)!r} changed since the scan" in timed.result.stderr
    assert (folder / ck(2)).read_bytes() == corpus()["zip_large"]


def test_folder_replaced_during_pass(slow_folder: Path, tmp_path: Path) -> None:
    """Deletion goes through the folder handle: a new folder at the same path is not touched."""
    moved = tmp_path / "moved-away"
    fresh = tmp_path / "fresh"
    fill(fresh)

    def replace_folder() -> None:
        os.rename(slow_folder, moved)
        os.rename(fresh, slow_folder)

    timed = run_during_check(
        [str(slow_folder), "--once"], slow_folder / ck(1000), replace_folder, moved / ck(1000)
    )

    assert timed.hook_during_check
    assert timed.result.returncode == 0, timed.result.stderr
    assert names(slow_folder) == ckpts(*STEPS), "the pass deleted in the new folder"
    assert names(moved) == ckpts(4, 1000) | {LOCK}, "the pass did not finish in the old one"


@ROOT_ONLY
def test_deletion_refused_mid_pass(slow_folder: Path) -> None:
    """A deletion the filesystem refuses after the scan: logged, the rest of the pass goes on.

    A read-only remount cannot stand in here: remounting a bind mount read-only fails with
    EBUSY while the watcher holds its lock file open for writing on it.
    """
    if not can_set_immutable(slow_folder):
        pytest.skip("the filesystem has no immutable attribute")
    target = slow_folder / ck(1)
    try:
        timed = run_during_check(
            [str(slow_folder), "--once"],
            slow_folder / ck(1000),
            lambda: subprocess.run(["chattr", "+i", str(target)], check=True),
        )
        left = names(slow_folder)
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)

    assert timed.hook_during_check
    assert timed.result.returncode == 1
    assert f"failed to prune {ck(1)!r}" in timed.result.stderr
    assert "Operation not permitted" in timed.result.stderr
    assert left == ckpts(1, 4, 1000) | {LOCK}


def test_folder_replaced_in_process(folder: Path, tmp_path: Path, monkeypatch) -> None:
    """The same, with the swap placed exactly between planning and deleting."""
    moved = tmp_path / "moved-away"
    fresh = tmp_path / "fresh"
    fill(fresh)
    original = watcher.passes.execute_plan

    def swap_then_execute(*args, **kwargs):
        os.rename(folder, moved)
        os.rename(fresh, folder)
        return original(*args, **kwargs)

    monkeypatch.setattr(watcher.passes, "execute_plan", swap_then_execute)
    dir_fd = open_folder(folder)
    try:
        summary = Pruner(Policy(directory=folder)).run(dir_fd)
    finally:
        os.close(dir_fd)

    assert summary.pruned == 2
    assert names(folder) == ckpts(*STEPS)
    assert names(moved) == ckpts(3, 4)


class _SwapBeforeMutation:
    """Stand-in for the os module in watcher.prune that swaps a name once, just before the first
    call that changes the folder (unlink, rename, replace or link)."""

    MUTATING = ("unlink", "remove", "rename", "replace", "link")

    def __init__(self, swap) -> None:
        self._swap = swap

    def __getattr__(self, name: str):
        real = getattr(os, name)
        if name not in self.MUTATING:
            return real

        def call(*args, **kwargs):
            if self._swap is not None:
                swap, self._swap = self._swap, None
                swap()
            return real(*args, **kwargs)

        return call


def _prune_with_late_swap(folder: Path, monkeypatch, swap) -> None:
    monkeypatch.setattr(watcher.prune, "os", _SwapBeforeMutation(swap))
    dir_fd = open_folder(folder)
    try:
        Pruner(Policy(directory=folder, keep_last=3)).run(dir_fd)
    finally:
        os.close(dir_fd)


def _staged_swap(folder: Path, name: str, make_staged) -> Callable[[], None]:
    staged = folder / ".staged"

    def swap() -> None:
        make_staged(staged)
        os.replace(staged, folder / name)

    return swap


def test_late_link_swap_spares_target(folder: Path, tmp_path: Path, monkeypatch) -> None:
    """A link swapped in after the last check: the deletion never reaches its target."""
    victim = tmp_path / "victim.pt"
    victim.write_bytes(valid())
    swap = _staged_swap(folder, ck(1), lambda path: path.symlink_to(victim))

    _prune_with_late_swap(folder, monkeypatch, swap)

    assert victim.read_bytes() == valid()
    assert names(folder) >= ckpts(2, 3, 4)


def test_late_link_swap_keeps_link(folder: Path, tmp_path: Path, monkeypatch) -> None:
    victim = tmp_path / "victim.pt"
    victim.write_bytes(valid())
    swap = _staged_swap(folder, ck(1), lambda path: path.symlink_to(victim))

    _prune_with_late_swap(folder, monkeypatch, swap)

    assert (folder / ck(1)).is_symlink()


def test_late_resave_survives(folder: Path, monkeypatch) -> None:
    swap = _staged_swap(folder, ck(1), lambda path: path.write_bytes(corpus()["zip_large"]))

    _prune_with_late_swap(folder, monkeypatch, swap)

    assert (folder / ck(1)).read_bytes() == corpus()["zip_large"]


# ---------------------------------------------------------------------------
# Symlink swaps in a tight loop against many passes

SWAP_SECONDS = 3.0


def _swap_fixture(tmp_path: Path) -> tuple[Path, Path, Path]:
    folder = tmp_path / "checkpoints"
    fill(folder, steps=(1, 5))
    victim = tmp_path / "outside" / "victim.pt"
    victim.parent.mkdir()
    victim.write_bytes(valid())
    template = tmp_path / "template.pt"
    template.write_bytes(valid())
    return folder, victim, template


def _finish_swapper(swapper) -> dict:
    stdout, _ = swapper.communicate(timeout=SWAP_SECONDS + 30)
    assert swapper.returncode == 0
    return json.loads(stdout)


def test_swap_race_in_process(tmp_path: Path) -> None:
    folder, victim, template = _swap_fixture(tmp_path)
    victim_inode = victim.stat().st_ino
    swapper = start_swapper(folder, ck(1), str(victim), ck(5), template, SWAP_SECONDS)
    policy = Policy(directory=folder, keep_last=1)
    passes = pruned = skipped = 0
    dir_fd = open_folder(folder)
    try:
        deadline = time.monotonic() + SWAP_SECONDS
        while time.monotonic() < deadline and swapper.poll() is None:
            # A new Pruner each pass: a long-lived one counts the file, which keeps coming back
            # under a new directory entry, as a fresh arrival and keeps it, so the race would
            # rarely reach a deletion.
            summary = Pruner(policy).run(dir_fd)
            passes += 1
            pruned += summary.pruned
            skipped += summary.skipped
            assert victim.stat().st_ino == victim_inode, f"outside target deleted in pass {passes}"
            assert (folder / ck(5)).exists(), f"inside target deleted in pass {passes}"
    finally:
        os.close(dir_fd)
        counts = _finish_swapper(swapper)

    print(f"swap race in process: {passes} passes, {pruned} pruned, {skipped} skipped, {counts}")
    assert victim.read_bytes() == valid()
    assert stat.S_ISREG((folder / ck(5)).lstat().st_mode)
    assert passes > 100
    assert counts["files_pruned"] > 0, "the race never reached a deletion"


def test_swap_race_daemon(tmp_path: Path, start_watcher) -> None:
    folder, victim, template = _swap_fixture(tmp_path)
    watcher_process = start_watcher(str(folder), "--keep-last", "1")
    assert watcher_process.wait_for_log("pass done")
    swapper = start_swapper(folder, ck(1), str(victim), ck(5), template, SWAP_SECONDS)
    counts = _finish_swapper(swapper)
    assert watcher_process.stop() == 0
    passes = watcher_process.log.count("pass done")

    arrivals = watcher_process.log.count("arrived after step")
    print(f"swap race against the daemon: {passes} passes, {arrivals} arrival warnings, {counts}")
    assert victim.read_bytes() == valid()
    assert stat.S_ISREG((folder / ck(5)).lstat().st_mode)
    assert passes > 10
