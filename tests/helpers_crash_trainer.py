"""SIGKILL trials of the trainer while a watcher daemon prunes its checkpoint folder.

A setup run saves the first checkpoints. Then every trial starts `python -m trainer --resume`,
checks that the resume names the newest checkpoint the previous kill left, lets it train
(saving every step) and kills it with SIGKILL at a moment chosen in one of three ways:

- uniform: a random delay after training starts;
- temp: a short random delay after the temp file of a save appears in the folder;
- rename: a short random delay after a new checkpoint name appears.

After each kill the folder is checked against what was on disk before the kill. The phase the
trainer was in is read from what it left: its log, which has a line for every step and every
finished save, and its temp file. A file under a checkpoint name is validity-checked as soon as a
listing shows it, and again whenever its size or times change. One watcher daemon runs through
all trials, so its pruning races every save.
"""

from __future__ import annotations

import collections
import fnmatch
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers_crash import PYTHON, LoggedProcess, busy_wait, run_watcher_once, start_watcher

from watcher.scan import LOCK_NAME, NameMatcher
from watcher.validity import check_file

TINY_OPTIONS = [
    "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32",
    "--batch-size", "8", "--max-corpus-bytes", "200000",
]  # fmt: skip
PATTERN = "model_v2_step*.pt"
KEEP_LAST = 2
KEEP_EVERY = 20
WATCHER_OPTIONS = ["--keep-last", str(KEEP_LAST), "--keep-every", str(KEEP_EVERY)]

NAME_REGEX = re.compile(r"model_v2_step(\d+)_(\d{8}_\d{6})_s(\d+)\.pt")
TEMP_REGEX = re.compile(r"\.model_v2_step(\d+)_\d{8}_\d{6}_s\d+\.pt\.tmp\.(\d+)")
RESUME_REGEX = re.compile(r"resuming run (\S+) from (\S+) at step (\d+)")
SAVED_REGEX = re.compile(r"saved checkpoint \S+ at step (\d+)")
STEP_REGEX = re.compile(r"trainer\.loop: step (\d+) loss")

MODES = ("uniform", "temp", "rename")
MODE_WEIGHTS = (0.4, 0.4, 0.2)
MAX_UNIFORM_DELAY = 0.6
"""Seconds after training starts within which a uniform kill lands: about 100 steps."""
MAX_TEMP_DELAY = 0.003
"""Seconds after the temp file appears. With this polling running, a TINY save kept its temp file
for 0.6 ms to 13 ms (10th to 90th percentile, 2-core VM), so most of these kills land in the save."""
MAX_RENAME_DELAY = 0.001
MAX_SAVES_BEFORE_ARMING = 20
POLL_INTERVAL = 0.0001
TRIGGER_TIMEOUT = 30.0
START_TIMEOUT = 120.0

TRAINING = "training step, no save under way"
SERIALIZING = "save started, temp file not created yet"
WRITING = "temp file created, write not finished"
WRITTEN = "temp file complete, not renamed yet"
RENAMED = "renamed, save not logged yet"
PHASES = (TRAINING, SERIALIZING, WRITING, WRITTEN, RENAMED)


@dataclass
class TrialRecord:
    index: int
    mode: str
    phase: str
    kill_after_ms: float
    """Time from the trainer's 'training' log line to the kill."""
    newest_before: int
    """Highest checkpoint step in the last listing made before the kill."""
    newest_after: int
    resumed_from: int
    temp_left: str | None
    seconds: float


@dataclass
class TrainerCrashReport:
    trials: list[TrialRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    resumes_checked: int = 0
    validity_checks: int = 0
    loads_checked: int = 0
    stray_temps: list[str] = field(default_factory=list)
    watcher_counted: int | None = None
    """Checkpoints that a final `--once --dry-run` counted."""
    checkpoint_files_at_end: int = 0
    milestones_at_end: int = 0
    seconds: float = 0.0

    def phase_counts(self) -> dict[str, int]:
        counts = collections.Counter(trial.phase for trial in self.trials)
        return {phase: counts[phase] for phase in PHASES}

    def mode_counts(self) -> dict[str, int]:
        counts = collections.Counter(trial.mode for trial in self.trials)
        return {mode: counts[mode] for mode in MODES}


class _Listing:
    """One listing of the checkpoint folder, split into checkpoint names and temp files."""

    def __init__(self, names: list[str]) -> None:
        self.names = set(names)
        self.steps = {}
        self.temps = {}
        for name in names:
            found = NAME_REGEX.fullmatch(name)
            if found is not None:
                self.steps[int(found[1])] = name
                continue
            temp = TEMP_REGEX.fullmatch(name)
            if temp is not None:
                self.temps[name] = (int(temp[1]), int(temp[2]))

    @property
    def newest(self) -> int | None:
        return max(self.steps) if self.steps else None

    def temp_of(self, pid: int) -> str | None:
        return next((name for name, (_, owner) in self.temps.items() if owner == pid), None)


class TrainerCrashChain:
    """Run the trials on one run folder under `work`, with one watcher daemon throughout."""

    def __init__(self, work: Path, seed: int = 0) -> None:
        self.work = work
        self.log_dir = work / "run"
        self.folder = self.log_dir / "checkpoints"
        self.logs = work / "logs"
        self.random = random.Random(seed)
        self.report = TrainerCrashReport()
        self.ever_saved: set[int] = set()
        self._checked: dict[str, tuple[int, int, int, int]] = {}
        self._dir_fd: int | None = None
        self._next_resume: tuple[str, int] | None = None

    # Set-up and the whole chain

    def run(self, trials: int) -> TrainerCrashReport:
        started = time.monotonic()
        self.folder.mkdir(parents=True)
        self.logs.mkdir()
        self._dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        watcher = start_watcher(self.folder, WATCHER_OPTIONS, self.logs / "watcher.log")
        try:
            if watcher.wait_for_line("watching", START_TIMEOUT) is None:
                self._problem("the watcher daemon did not start watching the folder")
                return self.report
            self._setup_run()
            for index in range(trials):
                if watcher.process.poll() is not None:
                    self._problem(f"the watcher daemon exited before trial {index}")
                    break
                self.report.trials.append(self._trial(index))
            self._final_resume()
            self._check_final_set()
        finally:
            status = watcher.stop()
            os.close(self._dir_fd)
        if status != 0:
            self._problem(f"the watcher daemon exited with status {status} on SIGTERM")
        self._check_watcher_log(watcher.tail.lines)
        self._check_stray_temps()
        self.report.seconds = time.monotonic() - started
        return self.report

    def _trainer_command(self, *extra: str) -> list[str]:
        return [
            PYTHON, "-m", "trainer", *TINY_OPTIONS, "--save-every-steps", "1",
            "--log-every", "1", "--log-dir", str(self.log_dir), *extra,
        ]  # fmt: skip

    def _setup_run(self) -> None:
        trainer = LoggedProcess(
            self._trainer_command("--steps", "3"), self.logs / "trainer-setup.log"
        )
        status = trainer.process.wait(START_TIMEOUT)
        trainer.kill()
        listing = self._list()
        if status != 0 or listing.newest != 3:
            self._problem(f"setup run exited {status} and left steps {sorted(listing.steps)}")
        self.ever_saved.update(listing.steps)
        self._check_names(listing)
        run = NAME_REGEX.fullmatch(listing.steps[listing.newest])[2] if listing.steps else ""
        self._next_resume = (run, 3)

    # One trial

    def _trial(self, index: int) -> TrialRecord:
        started = time.monotonic()
        mode = self.random.choices(MODES, MODE_WEIGHTS)[0]
        trainer = LoggedProcess(
            self._trainer_command("--resume", "--steps", "1000000"),
            self.logs / f"trainer-{index:03d}.log",
        )
        at_start = self._list()
        resumed_from = self._wait_for_training(trainer, index)
        training_started = time.perf_counter()
        before = self._kill_when_due(trainer, mode, at_start)
        kill_after_ms = (time.perf_counter() - training_started) * 1000
        trainer.kill()

        after = self._list()
        self._check_names(after)
        phase = self._classify(trainer, after, at_start)
        self._check_after_kill(index, trainer, before, after)
        temp = after.temp_of(trainer.pid)
        if temp is not None:
            self.report.stray_temps.append(temp)
        return TrialRecord(
            index=index,
            mode=mode,
            phase=phase,
            kill_after_ms=kill_after_ms,
            newest_before=before.newest if before.newest is not None else -1,
            newest_after=after.newest if after.newest is not None else -1,
            resumed_from=resumed_from,
            temp_left=temp,
            seconds=time.monotonic() - started,
        )

    def _wait_for_training(self, trainer: LoggedProcess, index: int) -> int:
        """Wait for the trainer to start training and check its resume line; return its step."""
        if trainer.wait_for_line("training a model", START_TIMEOUT) is None:
            self._problem(f"trial {index}: the trainer did not start training")
            return -1
        expected_run, expected_step = self._next_resume
        lines = trainer.tail.lines
        resumed = next((RESUME_REGEX.search(line) for line in lines if "resuming" in line), None)
        warnings = [line for line in lines if " WARNING " in line]
        if warnings:
            self._problem(f"trial {index}: the resumed trainer warned: {warnings}")
        if resumed is None:
            self._problem(f"trial {index}: the trainer did not log a resume")
            return -1
        self.report.resumes_checked += 1
        step = int(resumed[3])
        if (resumed[1], step) != (expected_run, expected_step):
            self._problem(
                f"trial {index}: resumed run {resumed[1]} at step {step}, expected run "
                f"{expected_run} at step {expected_step}, the newest checkpoint left"
            )
        return step

    def _kill_when_due(self, trainer: LoggedProcess, mode: str, at_start: _Listing) -> _Listing:
        """Poll the folder until the mode's moment comes; return the last listing before it."""
        pid = trainer.pid
        deadline = time.perf_counter() + self.random.uniform(0, MAX_UNIFORM_DELAY)
        saves_to_skip = self.random.randint(0, MAX_SAVES_BEFORE_ARMING)
        delay = self.random.uniform(0, MAX_TEMP_DELAY if mode == "temp" else MAX_RENAME_DELAY)
        give_up = time.perf_counter() + TRIGGER_TIMEOUT
        seen_temps: set[str] = set()
        newest = at_start.newest
        renames = 0
        while True:
            listing = self._list()
            now = time.perf_counter()
            if trainer.process.poll() is not None or now >= give_up:
                return listing
            if mode == "uniform" and now >= deadline:
                return listing
            temp = listing.temp_of(pid)
            if mode == "temp" and temp is not None and temp not in seen_temps:
                seen_temps.add(temp)
                if len(seen_temps) > saves_to_skip:
                    busy_wait(delay)
                    return listing
            if mode == "rename" and listing.newest is not None and listing.newest != newest:
                newest = listing.newest
                renames += 1
                if renames > saves_to_skip:
                    busy_wait(delay)
                    return listing
            self.ever_saved.update(listing.steps)
            self._check_names(listing)
            time.sleep(POLL_INTERVAL)

    # Checks

    def _list(self) -> _Listing:
        return _Listing(os.listdir(self.folder))

    def _check_names(self, listing: _Listing) -> None:
        """Validity-check every file under a checkpoint name that is new or changed."""
        for name in listing.names:
            if not fnmatch.fnmatchcase(name, PATTERN):
                continue
            try:
                info = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # pruned since the listing
            key = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
            if self._checked.get(name) == key:
                continue
            verdict = check_file(self._dir_fd, name)
            if not verdict.valid and os.path.lexists(self.folder / name):
                self._problem(f"{name} is invalid under a checkpoint name: {verdict.reason}")
            self._checked[name] = key
            self.report.validity_checks += 1

    def _check_loads(self, name: str, step: int, index: int) -> None:
        import torch

        try:
            payload = torch.load(self.folder / name, map_location="cpu", weights_only=True)
        # torch.load raises many types for a damaged file, and each one is a finding here.
        except Exception as error:  # noqa: BLE001
            self._problem(f"trial {index}: {name} does not load: {type(error).__name__}: {error}")
            return
        self.report.loads_checked += 1
        if payload.get("step") != step:
            self._problem(f"trial {index}: {name} stores step {payload.get('step')}")

    def _check_after_kill(
        self, index: int, trainer: LoggedProcess, before: _Listing, after: _Listing
    ) -> None:
        saved = [
            int(found[1]) for line in trainer.tail.lines if (found := SAVED_REGEX.search(line))
        ]
        self.ever_saved.update(saved)
        self.ever_saved.update(after.steps)
        must_exist = {
            step for step in (before.newest, max(saved, default=None)) if step is not None
        }
        for step in sorted(must_exist):
            if step not in after.steps:
                self._problem(
                    f"trial {index}: checkpoint of step {step}, complete before the kill, is gone"
                )
        if after.newest is None:
            self._problem(f"trial {index}: no checkpoint left after the kill")
            return
        if before.newest is not None and after.newest < before.newest:
            self._problem(f"trial {index}: newest step fell from {before.newest} to {after.newest}")
        newest_name = after.steps[after.newest]
        verdict = check_file(self._dir_fd, newest_name)
        if not verdict.valid:
            self._problem(f"trial {index}: newest {newest_name} is invalid: {verdict.reason}")
        self._check_loads(newest_name, after.newest, index)
        if before.newest is not None and before.newest != after.newest:
            self._check_loads(before.steps[before.newest], before.newest, index)
        self._next_resume = (NAME_REGEX.fullmatch(newest_name)[2], after.newest)

    def _classify(self, trainer: LoggedProcess, after: _Listing, at_start: _Listing) -> str:
        temp = after.temp_of(trainer.pid)
        if temp is not None:
            return WRITTEN if check_file(self._dir_fd, temp).valid else WRITING
        lines = trainer.tail.lines
        saved = [int(found[1]) for line in lines if (found := SAVED_REGEX.search(line))]
        stepped = [int(found[1]) for line in lines if (found := STEP_REGEX.search(line))]
        last_saved = max(saved, default=at_start.newest or 0)
        if after.newest is not None and after.newest > last_saved:
            return RENAMED
        if max(stepped, default=0) > last_saved:
            return SERIALIZING
        return TRAINING

    # End of the chain

    def _final_resume(self) -> None:
        """Resume once more and run one step to completion, which checks the last kill."""
        expected_step = self._next_resume[1]
        target = expected_step + 1
        trainer = LoggedProcess(
            self._trainer_command("--resume", "--steps", str(target)),
            self.logs / "trainer-final.log",
        )
        status = trainer.process.wait(START_TIMEOUT)
        trainer.kill()
        found = next(
            (match for line in trainer.tail.lines if (match := RESUME_REGEX.search(line))), None
        )
        if status != 0 or found is None or (found[1], int(found[3])) != self._next_resume:
            self._problem(
                f"final resume exited {status}, resume line {found and found[0]!r}, expected "
                f"step {expected_step}"
            )
            return
        self.report.resumes_checked += 1
        self.ever_saved.add(target)
        listing = self._list()
        self._check_names(listing)
        if target not in listing.steps:
            self._problem(f"final resume did not save step {target}")

    def expected_final_steps(self) -> set[int]:
        """Return the steps the policy keeps out of every step ever saved."""
        milestones = {step for step in self.ever_saved if step % KEEP_EVERY == 0}
        others = sorted(self.ever_saved - milestones, reverse=True)
        return milestones | set(others[:KEEP_LAST])

    def _check_final_set(self) -> None:
        expected = self.expected_final_steps()
        deadline = time.monotonic() + 15
        while set(self._list().steps) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        present = set(self._list().steps)
        self.report.checkpoint_files_at_end = len(present)
        self.report.milestones_at_end = sum(step % KEEP_EVERY == 0 for step in present)
        if present != expected:
            self._problem(
                f"final steps differ from the policy: missing {sorted(expected - present)}, "
                f"extra {sorted(present - expected)}"
            )

    def _check_watcher_log(self, lines: list[str]) -> None:
        for line in lines:
            if " ERROR " in line or " WARNING " in line or "Traceback" in line:
                self._problem(f"watcher log: {line}")
            if "invalid, kept" in line:
                self._problem(f"the watcher saw an invalid checkpoint: {line}")
            if "pruned '." in line:
                self._problem(f"the watcher pruned a temp file: {line}")

    def _check_stray_temps(self) -> None:
        matcher = NameMatcher(PATTERN)
        present = set(os.listdir(self.folder))
        # A killed save leaves its temp file; the next trainer start removes it, and the final
        # run to completion starts after the last kill, so none may be left at the end.
        for temp in self.report.stray_temps:
            if temp in present:
                self._problem(f"stray temp file {temp} was not removed by the next trainer start")
            if matcher.match(temp) is not None or fnmatch.fnmatchcase(temp, PATTERN):
                self._problem(f"stray temp file {temp} matches the checkpoint pattern")
        others = present - {LOCK_NAME}
        unexpected = [name for name in others if NAME_REGEX.fullmatch(name) is None]
        if unexpected:
            self._problem(f"unexpected files in the folder: {sorted(unexpected)}")
        result = run_watcher_once(self.folder, ["--dry-run", *WATCHER_OPTIONS])
        counted = re.search(r"pass done in [0-9.]+ ms: (\d+) checkpoints", result.stderr)
        if result.returncode != 0 or counted is None:
            self._problem(f"--once --dry-run failed: {result.stderr[-2000:]}")
            return
        self.report.watcher_counted = int(counted[1])
        if self.report.watcher_counted != self.report.checkpoint_files_at_end:
            self._problem(
                f"the watcher counted {counted[1]} checkpoints, the folder has "
                f"{self.report.checkpoint_files_at_end} checkpoint files"
            )
        if "would prune" in result.stdout:
            self._problem(f"--once --dry-run would prune more: {result.stdout[:2000]}")

    def _problem(self, text: str) -> None:
        self.report.problems.append(text)


def run_trainer_crashes(work: Path, trials: int, seed: int = 0, keep: bool = True):
    """Run `trials` kills in a new folder `work` and return the report."""
    try:
        return TrainerCrashChain(work, seed).run(trials)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
