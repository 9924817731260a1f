"""Tests of the trainer's checkpoint save, whose fsync and rename run on a background thread.

In-process tests hold the background part of a save at a gate so that the folder can be read,
changed or removed between the write and the rename. The fsync, the rename and their errors stay
real. Process tests run `python -m trainer` through a small wrapper with the same gate, driven
by files, and send real signals.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from trainer import saving
from trainer.checkpoint import CheckpointSaveError, temp_path
from trainer.saving import BackgroundSaver, save_atomic

NAME = "model_v2_step7_20240101_000000_s0.pt"
TINY_OPTIONS = [
    "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32",
    "--batch-size", "8", "--max-corpus-bytes", "200000", "--log-every", "1",
    "--save-every-steps", "5",
]  # fmt: skip
NAME_PATTERN = re.compile(r"model_v2_step(\d+)_\d{8}_\d{6}_s\d+\.pt")
TEMP_PATTERN = re.compile(r"\.model_v2_step(\d+)_\d{8}_\d{6}_s\d+\.pt\.tmp\.(\d+)")
HOLD_FROM_STEP = 10
TIMEOUT = 60.0

# Runs the trainer with the background part of each save from step argv[2] on held until the
# file `release` exists in the folder argv[1]. A file `held-STEP` there marks each held save.
GATED_TRAINER = """
import sys
import time
from pathlib import Path

from trainer import saving

control = Path(sys.argv[1])
hold_from = int(sys.argv[2])
finish = saving._finish_and_log


def held(file, path, step, *rest):
    if step >= hold_from:
        (control / f"held-{step}").touch()
        deadline = time.monotonic() + 60
        while not (control / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
    return finish(file, path, step, *rest)


saving._finish_and_log = held
from trainer.cli import main

sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture
def payload() -> dict:
    """A small trainer-like payload: a model and AdamW state after one step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 7}


@pytest.fixture
def saver():
    background = BackgroundSaver()
    yield background
    background.close()


@pytest.fixture
def gate(monkeypatch, saver) -> threading.Event:
    """Hold the background part of each save until the returned event is set.

    The gate opens before `saver` closes, because this fixture depends on it.
    """
    release = threading.Event()
    finish = saving._finish_and_log

    def held(*args):
        release.wait(timeout=TIMEOUT)
        return finish(*args)

    monkeypatch.setattr(saving, "_finish_and_log", held)
    yield release
    release.set()


def assert_same_tensors(expected: dict, actual: dict) -> None:
    for key, tensor in expected["model"].items():
        assert torch.equal(actual["model"][key], tensor), key


# In-process: order of the steps and errors of the background part


def test_save_name_absent_until_wait(tmp_path, payload, gate, saver):
    path = tmp_path / NAME
    saver.save(payload, path)
    after_return = set(os.listdir(tmp_path))
    gate.set()
    saver.wait()
    after_wait = set(os.listdir(tmp_path))

    assert after_return == {temp_path(path).name}
    assert after_wait == {NAME}
    assert_same_tensors(payload, torch.load(path, weights_only=True))


def test_save_temp_complete_on_return(tmp_path, payload, gate, saver):
    path = tmp_path / NAME
    saver.save(payload, path)
    loaded = torch.load(temp_path(path), weights_only=True)
    assert loaded["step"] == 7
    assert_same_tensors(payload, loaded)


def test_save_snapshot_ignores_later_changes(tmp_path, payload, gate, saver):
    path = tmp_path / NAME
    expected = {"model": {key: t.clone() for key, t in payload["model"].items()}}
    saver.save(payload, path)
    for tensor in payload["model"].values():
        tensor.add_(1.0)
    gate.set()
    saver.wait()
    assert_same_tensors(expected, torch.load(path, weights_only=True))


def test_save_syncs_then_renames_in_background(tmp_path, payload, monkeypatch, saver):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        target = os.readlink(f"/proc/self/fd/{descriptor}")
        calls.append(("fsync", Path(target).name, threading.current_thread().name))
        real_fsync(descriptor)

    def replace(source, destination):
        calls.append(("replace", Path(destination).name, threading.current_thread().name))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / NAME
    saver.save(payload, path)
    saver.wait()
    monkeypatch.undo()

    assert [call[:2] for call in calls] == [
        ("fsync", temp_path(path).name),
        ("replace", NAME),
        ("fsync", tmp_path.name),
    ]
    assert all(call[2].startswith("checkpoint-sync") for call in calls), calls


def test_save_timing_blocked_within_durable(tmp_path, payload, saver):
    blocked = saver.save(payload, tmp_path / NAME)
    timing = saver.wait()
    assert timing.blocked == blocked
    assert 0 < timing.blocked <= timing.durable


def test_save_logs_after_rename(tmp_path, payload, saver, caplog):
    path = tmp_path / NAME
    with caplog.at_level(logging.INFO, logger="trainer.saving"):
        saver.save(payload, path)
        saver.wait()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert re.fullmatch(
        rf"saved checkpoint {re.escape(str(path))} at step 7 in [0-9.]+ s "
        r"\(training blocked for [0-9.]+ s\)",
        messages[0],
    )


def test_wait_without_save_returns_none(saver):
    assert saver.wait() is None


def test_folder_removed_raises_at_wait(tmp_path, payload, gate, saver):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    path = folder / NAME
    saver.save(payload, path)
    shutil.rmtree(folder)
    gate.set()
    with pytest.raises(CheckpointSaveError) as raised:
        saver.wait()
    assert str(path) in str(raised.value)
    assert "No such file or directory" in str(raised.value)
    assert raised.value.path == path


def test_folder_removed_raises_at_next_save(tmp_path, payload, gate, saver):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    first = folder / NAME
    saver.save(payload, first)
    shutil.rmtree(folder)
    gate.set()
    with pytest.raises(CheckpointSaveError) as raised:
        saver.save(payload, tmp_path / NAME.replace("step7", "step8"))
    assert raised.value.path == first
    assert os.listdir(tmp_path) == [], "a save after a failed one was started"


def test_failed_save_raises_on_poll(tmp_path, payload, gate, saver):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    saver.save(payload, folder / NAME)
    saver.raise_if_failed()  # still held, so nothing to raise yet
    shutil.rmtree(folder)
    gate.set()
    deadline = time.monotonic() + TIMEOUT
    with pytest.raises(CheckpointSaveError):
        while time.monotonic() < deadline:
            saver.raise_if_failed()
            time.sleep(0.001)


def test_close_logs_failed_save(tmp_path, payload, gate, saver, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    path = folder / NAME
    saver.save(payload, path)
    shutil.rmtree(folder)
    gate.set()
    with caplog.at_level(logging.ERROR, logger="trainer.saving"):
        saver.close()
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert str(path) in errors[0]


def test_temp_replaced_by_folder_raises(tmp_path, payload, gate, saver):
    path = tmp_path / NAME
    saver.save(payload, path)
    path.mkdir()  # os.replace of a file onto a folder fails with EISDIR
    gate.set()
    with pytest.raises(CheckpointSaveError) as raised:
        saver.wait()
    assert "Is a directory" in str(raised.value)
    assert not temp_path(path).exists()


def test_unpicklable_payload_removes_temp(tmp_path, payload, saver):
    payload["callback"] = lambda: None
    with pytest.raises(Exception) as raised:
        saver.save(payload, tmp_path / NAME)
    assert not isinstance(raised.value, CheckpointSaveError)
    assert os.listdir(tmp_path) == []


def test_missing_folder_fails_write(tmp_path, payload, saver):
    path = tmp_path / "missing" / NAME
    with pytest.raises(CheckpointSaveError) as raised:
        saver.save(payload, path)
    assert str(path) in str(raised.value)
    assert saver.wait() is None


def test_save_atomic_name_present_on_return(tmp_path, payload):
    path = tmp_path / NAME
    seconds = save_atomic(payload, path)
    assert seconds > 0
    assert os.listdir(tmp_path) == [NAME]
    assert_same_tensors(payload, torch.load(path, weights_only=True))


# Real trainer processes with a held save


def wait_for_file(path: Path, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{path} did not appear:\n{log.read_text()}"
        time.sleep(0.01)


def listing(log_dir: Path) -> tuple[dict[int, Path], dict[int, str]]:
    """Return the checkpoints and the temp files of `log_dir`, by step."""
    folder = log_dir / "checkpoints"
    names = os.listdir(folder)
    checkpoints = {int(m[1]): folder / n for n in names if (m := NAME_PATTERN.fullmatch(n))}
    temps = {int(m[1]): n for n in names if (m := TEMP_PATTERN.fullmatch(n))}
    return checkpoints, temps


def start_gated(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Start a trainer whose saves from step HOLD_FROM_STEP on are held, and wait until one is."""
    control = tmp_path / "control"
    control.mkdir()
    log = tmp_path / "trainer.log"
    command = [
        sys.executable, "-c", GATED_TRAINER, str(control), str(HOLD_FROM_STEP),
        *TINY_OPTIONS, "--steps", "1000000", "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=tmp_path, stderr=output)
    wait_for_file(control / f"held-{HOLD_FROM_STEP}", process, log)
    return process, control, log


def run_trainer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_sigkill_while_held_then_resume(tmp_path):
    process, _, log = start_gated(tmp_path)
    held_checkpoints, held_temps = listing(tmp_path / "logs")
    process.kill()
    process.wait(timeout=TIMEOUT)
    checkpoints, temps = listing(tmp_path / "logs")

    assert sorted(held_checkpoints) == [5], log.read_text()
    assert list(held_temps) == [HOLD_FROM_STEP]
    assert sorted(checkpoints) == [5]
    assert list(temps) == [HOLD_FROM_STEP]

    log_dir = tmp_path / "logs"
    resumed = run_trainer("--resume", "--steps", "12", "--log-dir", str(log_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "removed stale temp file" in resumed.stderr
    assert re.search(r"resuming run \S+ from \S+ at step 5\n", resumed.stderr)
    checkpoints, temps = listing(log_dir)
    assert temps == {}
    assert sorted(checkpoints) == [5, 10, 12]
    for step, path in checkpoints.items():
        assert torch.load(path, weights_only=True)["step"] == step


@pytest.mark.parametrize(
    ("signum", "status"),
    [pytest.param(signal.SIGTERM, 0, id="SIGTERM"), pytest.param(signal.SIGINT, 130, id="SIGINT")],
)
def test_stop_signal_waits_for_held_save(tmp_path, signum, status):
    process, control, log = start_gated(tmp_path)
    process.send_signal(signum)
    time.sleep(0.5)  # the trainer stops training and waits for the held save
    still_running = process.poll() is None
    waiting_checkpoints, _ = listing(tmp_path / "logs")
    (control / "release").touch()
    returncode = process.wait(timeout=TIMEOUT)
    text = log.read_text()

    assert still_running, text
    assert HOLD_FROM_STEP not in waiting_checkpoints
    assert returncode == status, text
    stopped = re.search(rf"received {signal.Signals(signum).name} at step (\d+)", text)
    assert stopped, text
    last = int(stopped[1])
    checkpoints, temps = listing(tmp_path / "logs")
    assert temps == {}
    assert {5, HOLD_FROM_STEP, last} <= set(checkpoints)
    for step, path in checkpoints.items():
        assert torch.load(path, weights_only=True)["step"] == step

    log_dir = tmp_path / "logs"
    resumed = run_trainer(
        "--resume", "--steps", str(last + 2), "--log-dir", str(log_dir), cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"resuming run \S+ from \S+ at step {last}\n", resumed.stderr)
    assert last + 2 in listing(log_dir)[0]


def test_folder_removed_while_held_exit_1(tmp_path):
    process, control, log = start_gated(tmp_path)
    folder = tmp_path / "logs" / "checkpoints"
    held_name = listing(tmp_path / "logs")[1][HOLD_FROM_STEP][1:].rsplit(".tmp.", 1)[0]
    shutil.rmtree(folder)
    (control / "release").touch()
    returncode = process.wait(timeout=TIMEOUT)
    text = log.read_text()

    assert returncode == 1, text
    error = [line for line in text.splitlines() if " ERROR " in line]
    assert len(error) == 1, text
    assert str(folder / held_name) in error[0]
    assert "No such file or directory" in error[0]
    assert "Traceback" not in text
