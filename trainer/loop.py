"""Run setup (fresh or resumed), the training loop and checkpoint saves.

Resuming is exact: a run of N steps and a run stopped at step K < N and resumed to N end with
bitwise equal weights on CPU with the same thread count. Exactness follows because the
checkpoint stores the model, the AdamW state, the global torch RNG (dropout) and the sampler's
generator, and the learning rate depends only on the step, never on the total number of steps.
Different thread counts change the summation order of CPU kernels, so they break exactness.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import (
    CheckpointLoadError,
    checkpoint_name,
    list_checkpoints,
    make_folder,
    remove_stale_temp_files,
)
from trainer.config import TrainConfig
from trainer.data import BatchSampler, Corpus, load_corpus
from trainer.model import ByteTransformer, count_parameters
from trainer.resume import iter_loadable, resumed_config
from trainer.saving import BackgroundSaver
from trainer.stop import StopRequest

logger = logging.getLogger(__name__)


class TrainingError(Exception):
    """Training that cannot go on, such as a loss that is no longer finite."""


@dataclass
class Run:
    """The mutable state of one training run."""

    config: TrainConfig
    name: str
    corpus: Corpus
    model: ByteTransformer
    optimizer: torch.optim.AdamW
    sampler: BatchSampler
    step: int = 0
    saver: BackgroundSaver = field(default_factory=BackgroundSaver)
    """The run's checkpoint saves, of which at most one is pending."""


def checkpoint_folder(config: TrainConfig) -> Path:
    return Path(config.log_dir) / "checkpoints"


def learning_rate(config: TrainConfig, step: int) -> float:
    """Return the learning rate for the step after `step` steps: linear warmup, then constant."""
    if step >= config.warmup_steps:
        return config.lr
    return config.lr * (step + 1) / config.warmup_steps


def _new_run(config: TrainConfig, name: str) -> Run:
    corpus = load_corpus(config.data, config.max_corpus_bytes, min_bytes=config.seq_len + 1)
    torch.manual_seed(config.seed)
    model = ByteTransformer(config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    sampler = BatchSampler(corpus, config.batch_size, config.seq_len, config.seed)
    return Run(config, name, corpus, model, optimizer, sampler)


def _restore_run(config: TrainConfig, payload: dict[str, Any]) -> Run:
    """Build a run from a loaded checkpoint. Raise ValueError, KeyError or RuntimeError if the
    stored state does not fit the model.
    """
    run = _new_run(config, payload["run"])
    run.model.load_state_dict(payload["model"])
    run.optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["torch_rng_state"])
    run.sampler.set_state(payload["sampler_rng_state"])
    run.step = payload["step"]
    if payload["corpus_sha256"] != run.corpus.sha256:
        logger.warning(
            "training text from %s differs from the text the checkpoint was trained on, so "
            "the resumed run is not exact",
            run.corpus.source,
        )
    return run


def _resume(config: TrainConfig, explicit: frozenset[str]) -> Run | None:
    """Return the run restored from the newest loadable checkpoint, or None if none loads."""
    seed = config.seed if "seed" in explicit else None
    for file, payload in iter_loadable(checkpoint_folder(config), seed):
        try:
            resumed = resumed_config(payload["config"], config, explicit, file)
        except CheckpointLoadError as error:
            logger.warning("skipping checkpoint %s: %s", file.path, error)
            continue
        try:
            run = _restore_run(resumed, payload)
        except (ValueError, KeyError, RuntimeError) as error:
            logger.warning("skipping checkpoint %s, whose state does not fit: %s", file.path, error)
            continue
        logger.info("resuming run %s from %s at step %d", run.name, file.path, run.step)
        return run
    return None


def start_run(config: TrainConfig, explicit: frozenset[str], resume: bool) -> Run:
    """Return a resumed run if `resume` and a checkpoint loads, else a fresh run."""
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    if resume:
        run = _resume(config, explicit)
        if run is not None:
            return run
        seed_note = f"with seed {config.seed} " if "seed" in explicit else ""
        logger.warning(
            "--resume: no loadable checkpoint %sin %s; starting a new run",
            seed_note,
            checkpoint_folder(config),
        )
    return _new_run(config, new_run_name(checkpoint_folder(config), config.seed))


def new_run_name(folder: Path, seed: int) -> str:
    """Return the local time as YYYYmmdd_HHMMSS, waiting for a second not yet used by `seed`.

    Waiting keeps a run that starts in the same second as an earlier run of the same seed from
    overwriting that run's checkpoints. NOTE: two runs that start at once still collide.
    """
    used = {file.run for file in list_checkpoints(folder) if file.seed == seed}
    while True:
        name = time.strftime("%Y%m%d_%H%M%S", time.localtime())
        if name not in used:
            return name
        time.sleep(1.0 - time.time() % 1.0)


def _train_step(run: Run) -> float:
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.config, run.step)
    inputs, targets = run.sampler.next_batch()
    loss = run.model.loss(inputs, targets)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    run.optimizer.step()
    return loss.item()


def save(run: Run) -> None:
    """Start an atomic save of a checkpoint of `run`, whose fsync and rename run in the background.

    Raise CheckpointSaveError if the write, or the background part of the previous save, failed.
    """
    folder = checkpoint_folder(run.config)
    path = folder / checkpoint_name(run.step, run.name, run.config.seed)
    payload = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "step": run.step,
        "run": run.name,
        "config": run.config.to_dict(),
        "torch_rng_state": torch.get_rng_state(),
        "sampler_rng_state": run.sampler.get_state(),
        "corpus_sha256": run.corpus.sha256,
    }
    run.saver.save(payload, path)


class _LossMeter:
    """Mean loss and steps per second since the last report."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0
        self.started = time.monotonic()

    def add(self, loss: float) -> None:
        self.total += loss
        self.count += 1

    def report(self) -> tuple[float, float]:
        elapsed = time.monotonic() - self.started
        result = (self.total / self.count, self.count / elapsed if elapsed > 0 else math.inf)
        self.reset()
        return result


def train(run: Run, stop: StopRequest) -> None:
    """Train `run` until `config.steps` or a stop request, saving checkpoints on the way.

    On a stop request the current step finishes, then a checkpoint of it is saved unless one
    exists already. Return only when the last checkpoint is durable under its name. Raise
    TrainingError if the loss stops being finite, and CheckpointSaveError if a save fails. A
    save pending when an error is raised is finished first, and its own failure is logged.
    """
    config = run.config
    if run.step >= config.steps:
        logger.info("step %d reaches steps=%d; nothing left to train", run.step, config.steps)
        return
    make_folder(checkpoint_folder(config))
    remove_stale_temp_files(checkpoint_folder(config))
    logger.info(
        "run %s, seed %d: training a model of %d parameters from step %d to %d, threads=%d",
        run.name,
        config.seed,
        count_parameters(run.model),
        run.step,
        config.steps,
        torch.get_num_threads(),
    )
    try:
        _train_steps(run, stop)
        run.saver.wait()
    finally:
        run.saver.close()


def _train_steps(run: Run, stop: StopRequest) -> None:
    config = run.config
    run.model.train()
    saved_step = run.step
    saved_time = time.monotonic()
    meter = _LossMeter()
    while run.step < config.steps and stop.signum is None:
        loss = _train_step(run)
        run.step += 1
        if not math.isfinite(loss):
            raise TrainingError(
                f"loss is {loss} at step {run.step}; lower lr (now {config.lr}) or raise "
                "warmup_steps, then resume from the last checkpoint"
            )
        meter.add(loss)
        run.saver.raise_if_failed()
        if run.step % config.log_every == 0 or run.step == config.steps:
            mean_loss, rate = meter.report()
            logger.info("step %d loss %.4f steps/s %.1f", run.step, mean_loss, rate)
        if save_due(run, saved_time):
            save(run)
            saved_step = run.step
            saved_time = time.monotonic()
    if stop.signum is not None:
        logger.info("received %s at step %d; stopping", stop.signal_name, run.step)
    if run.step > saved_step:
        save(run)


def save_due(run: Run, saved_time: float) -> bool:
    """Return whether a checkpoint is due after the step just done, by step count or time."""
    config = run.config
    if run.step % config.save_every_steps == 0 or run.step == config.steps:
        return True
    if config.save_every_seconds is None:
        return False
    return time.monotonic() - saved_time >= config.save_every_seconds
