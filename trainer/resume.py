"""Choice of the checkpoint to resume from and of the config of the resumed run.

Policy:
- Candidates are all checkpoints in the folder, newest (highest step) first, whatever run or
  seed wrote them, because a folder normally contains one series. When the seed is set explicitly
  (option or config file), only checkpoints of that seed are candidates.
- A candidate that fails to load is skipped with a WARNING that names the file and the error.
- The resumed run keeps the run name and seed of the checkpoint, so its files continue the
  same series of names.
- Fields that shape the model or the training trajectory (FIXED_ON_RESUME) come from the
  checkpoint. Setting one of them explicitly to a different value is a ConfigError, because
  the result would be neither a resume nor a fresh run. Other fields, such as steps and
  save_every_steps, come from the checkpoint unless set explicitly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.checkpoint import (
    CheckpointFile,
    CheckpointLoadError,
    list_checkpoints,
    load_checkpoint,
)
from trainer.config import FIXED_ON_RESUME, ConfigError, TrainConfig, check_keys

logger = logging.getLogger(__name__)


def iter_loadable(folder: Path, seed: int | None) -> Iterator[tuple[CheckpointFile, dict]]:
    """Yield the checkpoints of `folder` that load, newest first, with their payloads.

    With `seed` set, checkpoints of other seeds are left out.
    """
    files = list_checkpoints(folder)
    if seed is not None:
        others = [file for file in files if file.seed != seed]
        if others:
            logger.info("ignoring %d checkpoints of seeds other than %d", len(others), seed)
        files = [file for file in files if file.seed == seed]
    for file in files:
        try:
            payload = load_checkpoint(file)
        except CheckpointLoadError as error:
            logger.warning("skipping checkpoint %s, which does not load: %s", file.path, error)
            continue
        yield file, payload


def resumed_config(
    stored: dict[str, Any], current: TrainConfig, explicit: frozenset[str], file: CheckpointFile
) -> TrainConfig:
    """Return the config of a run resumed from `file`, following the module's policy.

    Raise CheckpointLoadError if the stored config is invalid, and ConfigError if an explicit
    value conflicts with it.
    """
    try:
        check_keys(stored, f"config stored in {file.path.name}")
        stored_config = TrainConfig(**stored)
    except ConfigError as error:
        raise CheckpointLoadError(f"invalid stored config: {error}") from error
    _reject_conflicts(stored_config, current, explicit, file)
    overrides = {key: getattr(current, key) for key in explicit - FIXED_ON_RESUME}
    overrides["log_dir"] = current.log_dir
    return dataclasses.replace(stored_config, **overrides)


def _reject_conflicts(
    stored: TrainConfig, current: TrainConfig, explicit: frozenset[str], file: CheckpointFile
) -> None:
    conflicts = sorted(
        key for key in explicit & FIXED_ON_RESUME if getattr(stored, key) != getattr(current, key)
    )
    if not conflicts:
        return
    details = ", ".join(
        f"{key}={getattr(stored, key)!r} (requested {getattr(current, key)!r})" for key in conflicts
    )
    raise ConfigError(
        conflicts[0],
        f"--resume: checkpoint {file.path} was trained with {details}; remove "
        f"{', '.join(conflicts)} from the options and config file to resume it, or pass "
        "another --log-dir to start a new run",
    )
