"""Disk high-water mark with the trainer and a retention method running side by side.

The trainer saves often (its default model, every 2 steps) while a watcher daemon prunes its
checkpoint folder with --keep-last 2 --keep-every 50. This script follows the folder with its
own inotify watch (IN_CREATE, IN_MOVED_TO, IN_MOVED_FROM, IN_DELETE), so every state the
folder passes through is counted, in order, instead of samples of it. At each event it counts the
checkpoints, the milestones among them and the trainer's temp files. The bound is: checkpoints
never more than keep_last + milestones present + 1. The in-loop alternatives run in the same
way through the wrapper of trainer_cost.py, keeping the newest 2 and no milestones.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import benchlib as lib
from trainer_cost import wrapper_command

KEEP = 2
MILESTONE_EVERY = 50


class Census:
    """Counts of a checkpoint folder kept from inotify events, with their maxima."""

    def __init__(self, folder: Path) -> None:
        self.watch = lib.Inotify(
            folder, lib.IN_CREATE | lib.IN_MOVED_TO | lib.IN_MOVED_FROM | lib.IN_DELETE
        )
        self.checkpoints: set[str] = set()
        self.temps: set[str] = set()
        self.max_checkpoints = 0
        self.max_over_milestones = 0
        self.max_with_temps = 0
        self.events = 0
        self.excess_since: float | None = None
        self.lags: list[float] = []
        """Seconds from a rename that puts more than keep_last non-milestone checkpoints in the
        folder until the folder is back to keep_last, from event read times."""
        self.over_bound_since: float | None = None
        self.over_bound_spells: list[float] = []
        """Durations in seconds of each spell above the bound, from event read times."""

    def update(self, timeout: float) -> None:
        for when, mask, name in self.watch.read(timeout):
            self.events += 1
            target = self.temps if name.startswith(".") else self.checkpoints
            if mask & (lib.IN_CREATE | lib.IN_MOVED_TO):
                target.add(name)
            else:
                target.discard(name)
            milestones = sum(1 for step in map(_step, self.checkpoints) if _milestone(step))
            count = len(self.checkpoints)
            self._track_lag(when, count - milestones > KEEP)
            self.max_checkpoints = max(self.max_checkpoints, count)
            self.max_over_milestones = max(self.max_over_milestones, count - milestones)
            self.max_with_temps = max(self.max_with_temps, count + len(self.temps))
            self._track_bound(when, count - milestones > KEEP + 1)

    def _track_lag(self, when: float, excess: bool) -> None:
        if excess and self.excess_since is None:
            self.excess_since = when
        elif not excess and self.excess_since is not None:
            self.lags.append(when - self.excess_since)
            self.excess_since = None

    def _track_bound(self, when: float, over: bool) -> None:
        if over and self.over_bound_since is None:
            self.over_bound_since = when
        elif not over and self.over_bound_since is not None:
            self.over_bound_spells.append(when - self.over_bound_since)
            self.over_bound_since = None

    def close(self) -> None:
        self.watch.close()


def _step(name: str) -> int:
    return int(name.removeprefix("model_v2_step").split("_", 1)[0])


def _milestone(step: int) -> bool:
    return step % MILESTONE_EVERY == 0


def train_with(prefix: list[str], log_dir: Path, train_args: list[str], watcher: bool) -> dict:
    checkpoints = log_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    census = Census(checkpoints)
    daemon = None
    if watcher:
        daemon = lib.Daemon(
            checkpoints,
            "--keep-last",
            str(KEEP),
            "--keep-every",
            str(MILESTONE_EVERY),
            log_dir=log_dir,
        )
        daemon.wait_for_log("pass done")
    try:
        with open(log_dir / "trainer.log", "w") as log:
            process = subprocess.Popen(
                [*prefix, "--log-dir", str(log_dir), *train_args],
                cwd=lib.REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            while process.poll() is None:
                census.update(0.05)
        if process.returncode != 0:
            raise RuntimeError(f"trainer exited with {process.returncode}")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            census.update(0.05)
    finally:
        census.close()
        if daemon is not None:
            daemon.stop()
    saves = (log_dir / "trainer.log").read_text().count("saved checkpoint")
    return {
        "saves": saves,
        "events": census.events,
        "max_checkpoints": census.max_checkpoints,
        "max_over_milestones": census.max_over_milestones,
        "max_with_temps": census.max_with_temps,
        "final_checkpoints": len(census.checkpoints),
        "over_bound_spells": len(census.over_bound_spells),
        "longest_over_bound_seconds": max(census.over_bound_spells, default=0.0),
        "lags": census.lags,
    }


def main(argv=None) -> int:
    args = lib.parse_args(__doc__.splitlines()[0], argv)
    train_args = ["--seed", "0", "--save-every-steps", "2", "--log-every", "50"]
    if args.quick:
        train_args += ["--steps", "12", "--d-model", "32", "--n-layers", "1", "--n-heads", "2"]
        train_args += ["--max-corpus-bytes", "200000"]
    else:
        train_args += ["--steps", "300"]
    rounds = 1 if args.quick else 2
    with lib.bench_folder(args.tmp, "highwater") as parent:
        machine = lib.machine_info(parent)
        counter = iter(range(10**6))
        trainer = [lib.PYTHON, "-m", "trainer"]
        variants = {
            "trainer + watcher daemon": lambda: train_with(
                trainer, parent / f"run{next(counter)}", train_args, watcher=True
            ),
            "trainer + in-loop glob+mtime sort": lambda: train_with(
                wrapper_command("glob"), parent / f"run{next(counter)}", train_args, False
            ),
            "trainer + framework saved list": lambda: train_with(
                wrapper_command("list"), parent / f"run{next(counter)}", train_args, False
            ),
        }
        samples = lib.interleave(variants, rounds)

    bound = KEEP + 1
    rows = {
        name: {
            key: max(run[key] for run in runs)
            for key in (
                "saves",
                "max_checkpoints",
                "max_over_milestones",
                "max_with_temps",
                "over_bound_spells",
                "longest_over_bound_seconds",
            )
        }
        for name, runs in samples.items()
    }
    lags = {
        name: lib.summarize([lag for run in runs for lag in run["lags"]])
        for name, runs in samples.items()
    }
    targets = {
        f"{name}: checkpoints <= keep_last + milestones + 1": row["max_over_milestones"] <= bound
        for name, row in rows.items()
    }
    results = {
        "machine": machine,
        "quick": args.quick,
        "train_args": train_args,
        "rounds": rounds,
        "runs": samples,
        "rows": rows,
        "lags": lags,
        "targets": targets,
    }
    lines = [
        "## Disk high-water mark, trainer and retention side by side",
        "",
        (
            f"`python -m trainer {' '.join(train_args)}`, {rounds} runs per variant, interleaved; "
            f"watcher: --keep-last {KEEP} --keep-every {MILESTONE_EVERY}. Every folder change is "
            "seen through inotify; maxima over all runs."
        ),
        "",
        (
            "| variant | saves per run | max checkpoints "
            "| max checkpoints minus milestones present "
            "| max checkpoints + temp files | most spells over the bound in a run "
            "| longest spell ms |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['saves']} | {row['max_checkpoints']} | "
            f"{row['max_over_milestones']} | {row['max_with_temps']} | "
            f"{row['over_bound_spells']} | {row['longest_over_bound_seconds'] * 1000:.0f} |"
        )
    lines += ["", f"Bound: keep_last + 1 = {bound} beyond the milestones present.", ""]
    lines += [
        (
            "Time from a rename that puts more than keep_last non-milestone checkpoints in the "
            "folder until it is back to keep_last:"
        ),
        "",
        lib.table_ms(lags),
        "",
    ]
    lines += [f"- {name}: {'met' if met else 'MISSED'}" for name, met in targets.items()]
    lib.write_results("highwater", results, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
