"""Checkpoint files: names, temp files and validated loads. trainer/saving.py writes them.

A checkpoint is `<log_dir>/checkpoints/model_v2_step{step}_{run}_s{seed}.pt`, where `run` is
the local start time of the run as YYYYmmdd_HHMMSS. The file is a `torch.save` archive of a
dict that `torch.load(path, weights_only=True)` can read:

- `model`, `optimizer`: state dicts
- `step`: number of optimizer steps done
- `run`: the run name, also part of the file name
- `config`: the TrainConfig fields as plain values
- `torch_rng_state`, `sampler_rng_state`: uint8 tensors of the global torch generator and of
  the batch sampler's generator
- `corpus_sha256`: hex SHA-256 of the training text
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_GLOB = "model_v2_step*.pt"
_NAME_PATTERN = re.compile(r"model_v2_step(?P<step>\d+)_(?P<run>\d{8}_\d{6})_s(?P<seed>\d+)\.pt")

# Payload keys and the types `load_checkpoint` requires of them.
_REQUIRED_KEYS = {
    "model": dict,
    "optimizer": dict,
    "step": int,
    "run": str,
    "config": dict,
    "torch_rng_state": torch.Tensor,
    "sampler_rng_state": torch.Tensor,
    "corpus_sha256": str,
}


class CheckpointSaveError(Exception):
    """A checkpoint file or folder that could not be written."""

    def __init__(self, path: Path, cause: OSError, action: str = "save checkpoint") -> None:
        super().__init__(f"cannot {action} {path}: {cause}")
        self.path = path
        self.cause = cause


class CheckpointLoadError(Exception):
    """A checkpoint file that cannot be read or lacks what a resume needs."""


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint path with the step, run name and seed parsed from its name."""

    path: Path
    step: int
    run: str
    seed: int


def checkpoint_name(step: int, run: str, seed: int) -> str:
    return f"model_v2_step{step}_{run}_s{seed}.pt"


def temp_path(final: Path) -> Path:
    """Return the temp path for a save to `final`.

    The leading dot and the suffix keep it from matching CHECKPOINT_GLOB, so a watcher of the
    folder never takes it for a checkpoint. The process id keeps concurrent writers apart.
    """
    return final.with_name(f".{final.name}.tmp.{os.getpid()}")


def parse_name(path: Path) -> CheckpointFile | None:
    """Return the parsed name, or None if `path` is not named like a checkpoint."""
    match = _NAME_PATTERN.fullmatch(path.name)
    if match is None:
        return None
    return CheckpointFile(path, int(match["step"]), match["run"], int(match["seed"]))


def list_checkpoints(folder: Path) -> list[CheckpointFile]:
    """Return the checkpoints in `folder`, newest first.

    Newest means highest step, parsed as an integer. Ties between runs go to the later run
    name, then to the higher seed. File times play no part, because copies and restores
    change them.
    """
    if not folder.is_dir():
        return []
    parsed = (parse_name(path) for path in folder.glob(CHECKPOINT_GLOB))
    files = [file for file in parsed if file is not None]
    return sorted(files, key=lambda file: (file.step, file.run, file.seed), reverse=True)


_TEMP_PATTERN = re.compile(r"\.model_v2_step\d+_\d{8}_\d{6}_s\d+\.pt\.tmp\.(?P<pid>\d+)")


def remove_stale_temp_files(folder: Path) -> int:
    """Remove temp files that a killed trainer left in `folder`, and return how many went.

    A save interrupted by SIGKILL (the OOM killer, a preempted job) cannot clean up, and its temp
    file is as large as a checkpoint. Only names of the form temp_path() makes are removed, and
    only when no process with the id in the name is running, so a concurrent save is never hit.
    A temp file is never a checkpoint, so no checkpoint is ever removed here.
    """
    removed = 0
    for path in folder.glob(".model_v2_step*.pt.tmp.*"):
        match = _TEMP_PATTERN.fullmatch(path.name)
        if match is None or _process_running(int(match["pid"])):
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:
            logger.warning("failed to remove stale temp file %s: %s", path, error)
            continue
        logger.info(
            "removed stale temp file %s (%d bytes) left by process %s", path, size, match["pid"]
        )
        removed += 1
    return removed


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user has this id
    return True


def make_folder(folder: Path) -> None:
    """Create the checkpoint folder. Raise CheckpointSaveError if that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointSaveError(folder, error, action="create checkpoint folder") from error


def load_checkpoint(file: CheckpointFile) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True and check its keys against its name.

    Raise CheckpointLoadError if the file cannot be read, lacks a key, or has a step, run or
    seed that differs from its name.
    """
    try:
        payload = torch.load(file.path, map_location="cpu", weights_only=True)
    # torch.load raises many types for damaged files (RuntimeError, UnpicklingError, EOFError,
    # zipfile errors, OSError), so any Exception means "does not load".
    except Exception as error:
        raise CheckpointLoadError(f"{type(error).__name__}: {error}") from error
    if not isinstance(payload, dict):
        raise CheckpointLoadError(f"contains {type(payload).__name__}, expected a dict")
    for key, expected in _REQUIRED_KEYS.items():
        if not isinstance(payload.get(key), expected):
            raise CheckpointLoadError(f"key '{key}' is missing or not a {expected.__name__}")
    _check_matches_name(payload, file)
    return payload


def _check_matches_name(payload: dict[str, Any], file: CheckpointFile) -> None:
    stored = (payload["step"], payload["run"], payload["config"].get("seed"))
    if stored != (file.step, file.run, file.seed):
        raise CheckpointLoadError(
            f"step {stored[0]}, run {stored[1]!r} and seed {stored[2]!r} stored in the file "
            "differ from its name; a renamed file cannot be resumed"
        )
