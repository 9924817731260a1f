"""The trainer and the watcher side by side as two real processes, then a resume."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from conftest import REPO, wait_until

NAME = re.compile(r"model_v2_step(\d+)_(\d{8}_\d{6})_s(\d+)\.pt")
SMALL_MODEL = [
    "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32",
    "--batch-size", "8", "--max-corpus-bytes", "200000", "--log-every", "10",
]  # fmt: skip


def train(log_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", "--log-dir", str(log_dir), *SMALL_MODEL, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def checkpoint_steps(folder: Path) -> list[int]:
    steps = []
    for name in os.listdir(folder):
        found = NAME.fullmatch(name)
        if found:
            steps.append(int(found.group(1)))
    return sorted(steps)


class FolderSampler(threading.Thread):
    """Count the checkpoints in a folder many times a second and remember the highest count."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.highest = 0
        self.samples = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            if self.folder.exists():
                self.highest = max(self.highest, len(checkpoint_steps(self.folder)))
                self.samples += 1
            time.sleep(0.001)


def test_trainer_and_watcher_side_by_side(tmp_path: Path, start_watcher) -> None:
    folder = tmp_path / "checkpoints"
    watcher = start_watcher(str(folder), "--keep-last", "2", "--keep-every", "50")
    assert watcher.wait_for_log("waiting for it to appear")
    sampler = FolderSampler(folder)
    sampler.start()

    first = train(tmp_path, "--steps", "100", "--save-every-steps", "10", "--seed", "7")
    assert first.returncode == 0, first.stderr[-3000:]
    assert wait_until(lambda: checkpoint_steps(folder) == [50, 80, 90, 100]), checkpoint_steps(
        folder
    )

    resumed = train(tmp_path, "--steps", "130", "--save-every-steps", "10", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert wait_until(lambda: checkpoint_steps(folder) == [50, 100, 120, 130])
    sampler.running = False
    sampler.join()

    # keep_last 2, plus milestones 50 and 100, plus the one just written before it is pruned.
    assert sampler.samples > 100
    assert sampler.highest <= 2 + 2 + 1
    runs = set()
    for name in os.listdir(folder):
        found = NAME.fullmatch(name)
        if not found:
            continue
        state = torch.load(folder / name, weights_only=True)
        assert state["step"] == int(found.group(1))
        runs.add((found.group(2), found.group(3)))
    assert len(runs) == 1, f"resume started a new series: {runs}"
    assert runs.pop()[1] == "7"
    assert "step 100" in resumed.stderr
    assert watcher.stop() == 0
    assert "Traceback" not in watcher.log
