"""The watcher's command line as a real process: --once, --dry-run, config files, rejected input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, Samples, run_watcher, write_file

RUN = "20251027_110846"


def ck(step: int, seed: int = 42) -> str:
    return f"model_v2_step{step}_{RUN}_s{seed}.pt"


@pytest.fixture
def folder(tmp_path: Path, samples: Samples) -> Path:
    """A folder with five valid checkpoints of one series, written with falling file times."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for index, step in enumerate((100, 200, 300, 400, 500)):
        write_file(folder / ck(step), samples.valid, mtime=1_700_000_000 - index * 60)
    return folder


def names(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


def test_once_prunes_and_logs(folder: Path) -> None:
    result = run_watcher(str(folder), "--once")

    assert result.returncode == 0, result.stderr
    assert names(folder) == {ck(400), ck(500), ".ckpt-watcher.lock"}
    for step in (100, 200, 300):
        line = next(line for line in result.stderr.splitlines() if f"'{ck(step)}'" in line)
        assert "pruned" in line
        assert f"step {step}" in line
        assert f"series 'model_v2_step_{RUN}_s42.pt'" in line
        assert "older than the newest 2 valid checkpoints" in line
    assert "3 pruned" in result.stderr or "pruned 3" in result.stderr
    assert "policy: in " in result.stderr


def test_dry_run_deletes_nothing(folder: Path) -> None:
    before = names(folder)

    result = run_watcher(str(folder), "--once", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert names(folder) - {".ckpt-watcher.lock"} == before
    would = result.stdout.splitlines()
    assert len(would) == 3
    assert all(line.startswith("would prune 'model_v2_step") for line in would)
    assert all("older than the newest" in line for line in would)


def test_dry_run_into_closed_pipe(tmp_path: Path, samples: Samples) -> None:
    """A reader that stops early (`| head -1`) ends the dry run quietly, with nothing deleted."""
    folder = tmp_path / "many"
    folder.mkdir()
    for step in range(1, 1201):  # about 240 KB of list, far over a pipe's 64 KiB
        write_file(folder / ck(step), samples.valid)
    before = names(folder)
    process = subprocess.Popen(
        [sys.executable, "-m", "watcher", str(folder), "--once", "--dry-run"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    status = process.wait(timeout=60)

    assert first.startswith("would prune 'model_v2_step1_")
    assert status == 0, stderr
    assert "dry run stopped before its end" in stderr
    assert "Broken pipe" not in stderr
    assert "Exception ignored" not in stderr
    assert names(folder) - {".ckpt-watcher.lock"} == before


def test_once_json_fields(folder: Path, samples: Samples) -> None:
    """--once with JSON logs gives each deletion and each invalid file its own fields."""
    write_file(folder / ck(50), samples.valid[:100])

    result = run_watcher(str(folder), "--once", "--log-format", "json")

    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    events = {(record.get("event"), record.get("file")) for record in records}
    assert ("invalid", ck(50)) in events
    assert {("pruned", ck(step)) for step in (100, 200, 300)} <= events
    invalid = next(record for record in records if record.get("event") == "invalid")
    assert invalid["reason"].startswith("truncated")
    assert invalid["step"] == 50


def test_folder_under_a_file(tmp_path: Path) -> None:
    """A DIR below a regular file gets a message that names the file in its path."""
    (tmp_path / "plain").write_text("a file")

    result = run_watcher(str(tmp_path / "plain" / "checkpoints"), "--once")

    assert result.returncode == 1
    assert "a part of its path is a file" in result.stderr


def test_config_file_and_override(folder: Path, tmp_path: Path) -> None:
    config = tmp_path / "policy.yaml"
    config.write_text(f"directory: {folder}\nkeep_last: 1\nmilestones: [200]\n")

    result = run_watcher("--config", str(config), "--once", "--keep-last", "3")

    assert result.returncode == 0, result.stderr
    assert names(folder) == {ck(200), ck(300), ck(400), ck(500), ".ckpt-watcher.lock"}


def test_config_keep_every(folder: Path, tmp_path: Path) -> None:
    config = tmp_path / "policy.yaml"
    config.write_text(f"directory: {folder}\nkeep_last: 1\nkeep_every: 200\n")

    result = run_watcher("--config", str(config), "--once")

    assert result.returncode == 0, result.stderr
    assert names(folder) == {ck(200), ck(400), ck(500), ".ckpt-watcher.lock"}


REJECTED_CONFIGS = [
    ("keep_lastt: 2\n", "unknown key 'keep_lastt'"),
    ("keep_last: two\n", "keep_last"),
    ("keep_last: true\n", "keep_last"),
    ("keep_last: 0\n", "keep_last must be >= 1"),
    ("keep_last: 2.5\n", "keep_last"),
    ("keep_every: 0\n", "keep_every"),
    ("milestones: 1000\n", "milestones must be a list"),
    ("milestones: [1000, x]\n", "milestones"),
    ("milestones: [-5]\n", "milestones"),
    ("pattern: model.pt\n", "has no '*'"),
    ("pattern: 'sub/model_*.pt'\n", "path separator"),
    ("pattern: '..model_*.pt'\n", "'..'"),
    ("pattern: 5\n", "pattern must be a string"),
    ("dry_run: yes please\n", "dry_run must be true or false"),
    ("keep_last: 2: 3\n", "not valid YAML at line 1"),
    ("keep_last: 2\n  bad: indent\n", "not valid YAML at line 2"),
    ("- keep_last\n- 2\n", "must be a mapping"),
    ("just text\n", "must be a mapping"),
    ("rescan_interval: 0\n", "rescan_interval"),
]


@pytest.mark.parametrize("text, message", REJECTED_CONFIGS)
def test_config_rejected(folder: Path, tmp_path: Path, text: str, message: str) -> None:
    before = names(folder)
    config = tmp_path / "policy.yaml"
    config.write_text(text)

    result = run_watcher(str(folder), "--config", str(config), "--once")

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert names(folder) == before


def test_config_value_rejected_under_override(folder: Path, tmp_path: Path) -> None:
    """An invalid value in the file is rejected even where the command line sets that key."""
    before = names(folder)
    config = tmp_path / "policy.yaml"
    config.write_text("keep_last: -2\n")

    result = run_watcher(str(folder), "--config", str(config), "--keep-last", "1", "--once")

    assert result.returncode == 2
    assert f"in config file {str(config)!r}: keep_last" in result.stderr
    assert "Traceback" not in result.stderr
    assert names(folder) == before


REJECTED_ARGUMENTS = [
    (["--keep-last", "0"], "invalid --keep-last"),
    (["--keep-last", "-3"], "invalid --keep-last"),
    (["--keep-last", "two"], "invalid int value: 'two'"),
    (["--keep-every", "0"], "invalid --keep-every"),
    (["--milestones", "100,abc"], "invalid milestone 'abc'"),
    (["--pattern", "model.pt"], "has no '*'"),
    (["--pattern", "../model_*.pt"], "path separator"),
    (["--pattern", "model[*]_*.pt"], "has its first '*' inside [...]"),
    (["--rescan-interval", "0"], "rescan_interval"),
    (["--no-such-option"], "unrecognized arguments"),
]


@pytest.mark.parametrize("arguments, message", REJECTED_ARGUMENTS)
def test_argument_rejected(folder: Path, arguments: list[str], message: str) -> None:
    before = names(folder)

    result = run_watcher(str(folder), "--once", *arguments)

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert names(folder) == before


def test_missing_config_file(folder: Path, tmp_path: Path) -> None:
    result = run_watcher(str(folder), "--config", str(tmp_path / "nope.yaml"), "--once")

    assert result.returncode == 2
    assert "nope.yaml' not found" in result.stderr


def test_missing_directory(tmp_path: Path) -> None:
    result = run_watcher("--once")

    assert result.returncode == 2
    assert "missing checkpoint folder" in result.stderr


def test_missing_folder_once(tmp_path: Path) -> None:
    result = run_watcher(str(tmp_path / "absent"), "--once")

    assert result.returncode == 1
    assert "absent' not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_folder_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")

    result = run_watcher(str(path), "--once")

    assert result.returncode == 1
    assert "is not a folder" in result.stderr
    assert path.read_text() == "x"


def test_help_lists_exit_codes() -> None:
    result = run_watcher("--help")

    assert result.returncode == 0
    assert "exit status:" in result.stdout
    for code in ("0  done", "1  runtime failure", "2  invalid arguments"):
        assert code in result.stdout


def test_watcher_never_imports_torch(folder: Path) -> None:
    code = (
        "import sys; from watcher.cli import main; import watcher.daemon; "
        f"status = main([{str(folder)!r}, '--once', '-q']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(status)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr
    assert ck(100) not in names(folder)


def test_duplicate_config_key_rejected(folder: Path, tmp_path: Path) -> None:
    config = tmp_path / "policy.yaml"
    config.write_text("keep_last: 5\nkeep_last: 1\n")

    result = run_watcher(str(folder), "--config", str(config), "--once")

    assert result.returncode == 2
    assert "key 'keep_last' is given twice" in result.stderr
    assert "line 2" in result.stderr


def test_directory_expands_home(folder: Path, tmp_path: Path) -> None:
    config = tmp_path / "policy.yaml"
    config.write_text(f"directory: ~/{folder.name}\n")

    result = run_watcher(
        "--config", str(config), "--once", env={**os.environ, "HOME": str(folder.parent)}
    )

    assert result.returncode == 0, result.stderr
    assert names(folder) == {ck(400), ck(500), ".ckpt-watcher.lock"}


def test_pattern_matching_nothing_warns(folder: Path) -> None:
    result = run_watcher(str(folder), "--once", "--pattern", "checkpoint-*.pt")

    assert result.returncode == 0
    assert "no checkpoint matches the pattern 'checkpoint-*.pt'" in result.stderr
    assert f"'{ck(100)}'" in result.stderr


def test_pattern_with_leading_star_warns(folder: Path) -> None:
    result = run_watcher(str(folder), "--once", "--dry-run", "--pattern", "*.pt")

    assert result.returncode == 0
    assert "starts with '*'" in result.stderr


def test_lock_file_of_another_user(folder: Path) -> None:
    """A lock file that another user created, read-only to us, must not keep a watcher out."""
    lock = folder / ".ckpt-watcher.lock"
    lock.write_text("12345\n")
    os.chown(lock, 54321, 54321)
    os.chmod(lock, 0o644)
    os.chmod(folder, 0o777)
    for path in folder.glob("model_v2_step*"):
        os.chown(path, 12345, 12345)

    from watcher.lock import acquire_lock

    # Opened before the user changes, because the folders above tmp_path are private to root.
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    child = os.fork()
    if child == 0:  # the child becomes another unprivileged user and takes the lock
        status = 1
        try:
            os.setgid(12345)
            os.setuid(12345)
            status = 0 if acquire_lock(dir_fd, str(folder)) is not None else 1
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    os.close(dir_fd)

    assert os.waitstatus_to_exitcode(status) == 0


def test_interrupted_deletion_is_restored(folder: Path) -> None:
    """A crash between hiding a file and deleting it leaves the hidden name; it comes back."""
    os.rename(folder / ck(500), folder / f".ckpt-watcher.pruning.{ck(500)}")

    result = run_watcher(str(folder), "--once")

    assert result.returncode == 0, result.stderr
    assert names(folder) == {ck(400), ck(500), ".ckpt-watcher.lock"}
    assert f"restored '{ck(500)}'" in result.stderr


def test_leftover_hidden_file_survives(folder: Path, samples: Samples) -> None:
    """A hidden leftover whose name a newer save took is never restored over it, nor deleted."""
    hidden = folder / f".ckpt-watcher.pruning.{ck(200)}"
    older = samples.valid + b"older version"
    hidden.write_bytes(older)

    result = run_watcher(str(folder), "--once")

    assert result.returncode == 1, result.stderr
    assert hidden.read_bytes() == older
    assert ck(200) in names(folder)
    assert names(folder) - {ck(200), hidden.name} == {ck(400), ck(500), ".ckpt-watcher.lock"}
    assert f"restored '{ck(200)}'" not in result.stderr
    assert f"cannot restore '{ck(200)}'" in result.stderr
    assert "is taken by a file that an interrupted deletion left" in result.stderr
    assert f"pruned '{ck(200)}'" not in result.stderr


def test_other_hidden_prefix_names_stay(folder: Path) -> None:
    """Only a regular file with a checkpoint name behind the prefix is the watcher's to restore."""
    prefix = ".ckpt-watcher.pruning."
    (folder / f"{prefix}somedir").mkdir()
    (folder / f"{prefix}notes.txt").write_text("kept")
    (folder / f"{prefix}{ck(7)}").symlink_to("/etc/hostname")
    hidden = {f"{prefix}somedir", f"{prefix}notes.txt", f"{prefix}{ck(7)}"}

    result = run_watcher(str(folder), "--once")

    assert result.returncode == 0, result.stderr
    assert names(folder) == hidden | {ck(400), ck(500), ".ckpt-watcher.lock"}
    assert "restored" not in result.stderr


@pytest.mark.parametrize("created", [1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.25])
def test_text_log_time_matches_the_standard_format(created: float) -> None:
    """The text formatter reuses the time of the last second; it must print what logging does."""
    import logging

    from watcher.logs import TextFormatter

    formatter = TextFormatter()
    standard = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for offset in (0.0, 0.5, 1.0):
        record = logging.LogRecord("watcher", logging.INFO, "", 0, "message", (), None)
        record.created = created + offset
        record.msecs = (record.created - int(record.created)) * 1000
        assert formatter.format(record) == standard.format(record)
