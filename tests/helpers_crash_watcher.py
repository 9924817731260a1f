"""SIGKILL trials of the watcher daemon in the middle of a pass over a large folder.

The folder contains several series of small real torch files, with milestones, invalid files
under checkpoint names, symbolic links (to old checkpoints, in a chain, dangling, and one
named like a checkpoint) and files that are no checkpoints. The set of files the policy keeps
is computed here from the rules, independently of the watcher's code.

A trial builds the folder, starts `python -m watcher DIR`, kills it with SIGKILL once or twice
(while it scans and checks files, or after a random number of deletions), then restarts it and
lets it finish. The final folder must equal the result of one uninterrupted `--once` run on an
identical folder, and no kill may ever have cost a file the policy keeps.
"""

from __future__ import annotations

import collections
import io
import os
import random
import re
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from helpers_crash import LoggedProcess, run_watcher_once, start_watcher

from watcher.prune import PRUNING_PREFIX
from watcher.scan import LOCK_NAME

RUN = "20260101_000000"
START_TIMEOUT = 60.0
PASS_TIMEOUT = 600.0
EARLY = "during scan and validity checks"
DELETING = "during deletions"
DONE = "after all deletions"
PHASES = (EARLY, DELETING, DONE)
PRUNED_TEXT = " pruned '"


def checkpoint_name(step: int, seed: int) -> str:
    return f"model_v2_step{step}_{RUN}_s{seed}.pt"


@dataclass(frozen=True)
class FolderSpec:
    """Shape of a trial folder and the policy applied to it.

    The folder has `series` series of `per_series` checkpoints each, at steps stride, 2 * stride
    and so on.
    """

    series: int = 4
    per_series: int = 5000
    stride: int = 10
    keep_last: int = 2
    keep_every: int = 1000
    milestones: tuple[int, ...] = (12340, 33330)

    def options(self) -> list[str]:
        return [
            "--keep-last", str(self.keep_last), "--keep-every", str(self.keep_every),
            "--milestones", ",".join(str(step) for step in self.milestones),
        ]  # fmt: skip

    def steps(self) -> list[int]:
        return [self.stride * (index + 1) for index in range(self.per_series)]

    def is_milestone(self, step: int) -> bool:
        return step % self.keep_every == 0 or step in self.milestones


@dataclass(frozen=True)
class Contents:
    """Bytes written into the folder: real torch files and damaged or foreign ones."""

    valid: bytes
    legacy: bytes
    truncated: bytes
    foreign: bytes


def make_contents() -> Contents:
    import torch

    state = {"weight": torch.arange(64, dtype=torch.float32).reshape(8, 8), "step": 1}
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    foreign = io.BytesIO()
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    valid = zipped.getvalue()
    return Contents(valid, legacy.getvalue(), valid[: len(valid) // 2], foreign.getvalue())


@dataclass(frozen=True)
class Layout:
    """Every entry of the folder and the names the policy keeps, derived from a FolderSpec."""

    files: dict[str, bytes]
    links: dict[str, str]
    directories: tuple[str, ...]
    candidates: frozenset[str]
    """Regular files the policy decides on: whole name matches, digits where the step starts."""
    keep: frozenset[str]

    @property
    def prune(self) -> frozenset[str]:
        return self.candidates - self.keep


def plan_layout(spec: FolderSpec, contents: Contents) -> Layout:
    """Lay out the folder and compute what the policy keeps, from the rules alone."""
    files: dict[str, bytes] = {}
    invalid: set[str] = set()
    damaged = (b"", contents.truncated, contents.foreign)
    steps = spec.steps()
    for seed in range(spec.series):
        for index, step in enumerate(steps):
            name = checkpoint_name(step, seed)
            if index % 89 == 44:
                files[name] = damaged[(index // 89) % len(damaged)]
                invalid.add(name)
            else:
                files[name] = contents.legacy if index % 13 == 5 else contents.valid
    # The newest file of series 0 and the second newest of series 1 are invalid, so each of
    # those series keeps its newest valid files below an invalid one.
    for seed, back in ((0, 1), (1 % spec.series, 2)):
        name = checkpoint_name(steps[-back], seed)
        files[name] = contents.truncated
        invalid.add(name)

    last = spec.series - 1
    best = checkpoint_name(steps[len(steps) // 4 + 1], 0)
    chained = checkpoint_name(steps[len(steps) // 3 + 1], 1 % spec.series)
    named_like_checkpoint = checkpoint_name(steps[len(steps) // 2 + 1], 2 % spec.series)
    milestone = checkpoint_name(steps[spec.keep_every // spec.stride - 1], last)
    linked = {best, chained, named_like_checkpoint, milestone}
    links = {
        "best.pt": best,
        "chain-end.pt": chained,
        "latest.pt": "chain-end.pt",
        checkpoint_name(99_999_999, 2 % spec.series): named_like_checkpoint,
        "milestone.pt": milestone,
        "dangling.pt": checkpoint_name(7, 99),
    }
    files[f".{checkpoint_name(steps[-1] + spec.stride, 0)}.tmp.4242"] = contents.truncated
    files["notes.txt"] = b"training notes\n"
    files[f"model_v2_stepfinal_{RUN}_s0.pt"] = contents.valid
    directories = (checkpoint_name(55, last),)

    candidates = frozenset(name for name in files if re.fullmatch(r"model_v2_step\d.*\.pt", name))
    keep = _keep_by_rules(spec, candidates, invalid, linked)
    return Layout(files, links, directories, candidates, keep)


def _keep_by_rules(
    spec: FolderSpec, candidates: frozenset[str], invalid: set[str], linked: set[str]
) -> frozenset[str]:
    """Keep invalid files, link targets, milestones and the newest keep_last valid others."""
    by_series: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for name in candidates:
        found = re.fullmatch(r"model_v2_step(\d+)(.*)", name)
        by_series[found[2]].append((int(found[1]), name))
    keep = set(invalid) | (linked & candidates)
    for entries in by_series.values():
        newest = []
        for step, name in sorted(entries, reverse=True):
            if spec.is_milestone(step):
                keep.add(name)
            elif name not in invalid and len(newest) < spec.keep_last:
                newest.append(name)
        keep.update(newest)
    return frozenset(keep)


def build_folder(folder: Path, layout: Layout) -> None:
    folder.mkdir(parents=True)
    for name, data in layout.files.items():
        descriptor = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(descriptor, data)
        finally:
            os.close(descriptor)
    for name, target in layout.links.items():
        os.symlink(target, folder / name)
    for name in layout.directories:
        (folder / name).mkdir()


def snapshot(folder: Path) -> dict[str, tuple]:
    """Return each entry except the lock file, as (kind, size) or (kind, link target).

    A file that a killed watcher left under its hidden pruning name counts under its own name:
    the next watcher gives the name back before its first pass.
    """
    entries = {}
    with os.scandir(folder) as listing:
        for entry in listing:
            if entry.name == LOCK_NAME:
                continue
            name = entry.name.removeprefix(PRUNING_PREFIX)
            if entry.is_symlink():
                entries[name] = ("link", os.readlink(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                entries[name] = ("dir",)
            else:
                entries[name] = ("file", entry.stat(follow_symlinks=False).st_size)
    return entries


@dataclass
class KillRecord:
    trial: int
    number: int
    """1 for the first kill of a trial, 2 for a kill of the restarted watcher."""
    plan: str
    phase: str
    deleted: int
    """Files deleted by this watcher process before it was killed."""
    kill_after_ms: float
    """Time from the watcher's 'watching' log line to the kill."""


@dataclass
class WatcherCrashReport:
    kills: list[KillRecord] = field(default_factory=list)
    trials: int = 0
    problems: list[str] = field(default_factory=list)
    entries: int = 0
    checkpoints: int = 0
    expected_prune: int = 0
    reference_seconds: float = 0.0
    build_seconds: list[float] = field(default_factory=list)
    final_pass_ms: list[float] = field(default_factory=list)
    """Pass durations that the restarted watchers logged."""
    seconds: float = 0.0

    def phase_counts(self) -> dict[str, int]:
        counts = collections.Counter(kill.phase for kill in self.kills)
        return {phase: counts[phase] for phase in PHASES}


class WatcherCrashTrials:
    """Kill and restart watchers on fresh copies of one folder layout under `work`."""

    def __init__(
        self, work: Path, spec: FolderSpec, seed: int = 0, options: list[str] | None = None
    ) -> None:
        self.work = work
        self.spec = spec
        # Options of the killed and restarted watchers. The reference run always uses the spec's.
        self.options = spec.options() if options is None else options
        self.random = random.Random(seed)
        self.layout = plan_layout(spec, make_contents())
        self.report = WatcherCrashReport()
        self.reference: dict[str, tuple] = {}
        # Latest time from 'watching' to the first deletion, which sets when early kills land.
        self._scan_seconds = 0.5
        # Share of the remaining deletions after which a deletion kill lands; None draws it at
        # random for each kill.
        self.kill_fraction: float | None = None

    def run(self, trials: int, keep_folders: bool = False) -> WatcherCrashReport:
        started = time.monotonic()
        self.work.mkdir(parents=True)
        self.report.entries = len(snapshot_names(self.layout))
        self.report.checkpoints = len(self.layout.candidates)
        self.report.expected_prune = len(self.layout.prune)
        self._make_reference()
        for index in range(trials):
            folder = self.work / f"trial-{index:03d}"
            self._trial(index, folder)
            self.report.trials += 1
            if not keep_folders:
                shutil.rmtree(folder)
        self.report.seconds = time.monotonic() - started
        return self.report

    def _build(self, folder: Path) -> None:
        started = time.monotonic()
        build_folder(folder, self.layout)
        self.report.build_seconds.append(time.monotonic() - started)

    def _make_reference(self) -> None:
        """Run one uninterrupted --once pass on a copy; it must match the rules."""
        folder = self.work / "reference"
        self._build(folder)
        started = time.monotonic()
        result = run_watcher_once(folder, self.spec.options())
        self.report.reference_seconds = time.monotonic() - started
        if result.returncode != 0:
            self._problem(f"reference --once exited {result.returncode}: {result.stderr[-2000:]}")
        self.reference = snapshot(folder)
        expected = {name for name in snapshot_names(self.layout) if name not in self.layout.prune}
        if set(self.reference) != expected:
            self._problem(
                "reference --once differs from the rules: kept "
                f"{sorted(set(self.reference) - expected)[:10]} and deleted "
                f"{sorted(expected - set(self.reference))[:10]}"
            )
        shutil.rmtree(folder)

    def _trial(self, index: int, folder: Path) -> None:
        self._build(folder)
        kills = 2 if index % 3 == 1 else 1
        for number in range(1, kills + 1):
            plan = "early" if number == 1 and index % 4 == 3 else "deletions"
            self._kill_one(index, number, plan, folder)
        watcher = start_watcher(folder, self.options, folder.parent / f"final-{index}.log")
        pass_line = watcher.wait_for_line("pass done", PASS_TIMEOUT)
        if pass_line is None:
            self._problem(f"trial {index}: the restarted watcher finished no pass")
        else:
            found = re.search(r"pass done in ([0-9.]+) ms", pass_line)
            self.report.final_pass_ms.append(float(found[1]))
        self._check_lock_holder(index, folder, watcher.pid, "restarted watcher")
        status = watcher.stop()
        if status != 0:
            self._problem(f"trial {index}: the restarted watcher exited {status} on SIGTERM")
        self._check_log(index, watcher.tail.lines)
        final = snapshot(folder)
        if final != self.reference:
            differs = sorted(set(final) ^ set(self.reference))
            self._problem(f"trial {index}: final folder differs from --once: {differs[:10]}")

    def _kill_one(self, index: int, number: int, plan: str, folder: Path) -> None:
        before = snapshot(folder)
        remaining = len(self.layout.prune & set(before))
        log_path = folder.parent / f"trial-{index}-kill-{number}.log"
        watcher = start_watcher(folder, self.options, log_path)
        if watcher.wait_for_line("watching", START_TIMEOUT) is None:
            self._problem(f"trial {index}: watcher {number} did not start: {watcher.tail.lines}")
            watcher.kill()
            return
        watching = time.monotonic()
        if plan == "early":
            self._wait_early(watcher)
        else:
            self._wait_for_deletions(watcher, self._kill_target(remaining))
        kill_after_ms = (time.monotonic() - watching) * 1000
        watcher.kill()

        after = snapshot(folder)
        deleted = set(before) - set(after)
        if not deleted:
            phase = EARLY
        elif len(deleted) < remaining:
            phase = DELETING
        else:
            phase = DONE
        record = KillRecord(index, number, plan, phase, len(deleted), kill_after_ms)
        self.report.kills.append(record)
        lost = sorted(deleted - self.layout.prune)
        if lost:
            self._problem(f"trial {index}, kill {number}: deleted files the policy keeps: {lost}")
        self._check_lock_holder(index, folder, watcher.pid, "killed watcher")
        self._check_log(index, watcher.tail.lines)

    def _kill_target(self, remaining: int) -> int:
        if self.kill_fraction is not None:
            return max(1, round(remaining * self.kill_fraction))
        return self.random.randint(1, max(1, remaining - 1))

    def _wait_early(self, watcher: LoggedProcess) -> None:
        time.sleep(self.random.uniform(0, self._scan_seconds))

    def _wait_for_deletions(self, watcher: LoggedProcess, target: int) -> None:
        """Return once the watcher has logged `target` deletions, or finished its pass."""
        watching = time.monotonic()
        pruned = 0
        deadline = watching + PASS_TIMEOUT
        while time.monotonic() < deadline and watcher.process.poll() is None:
            new = watcher.tail.read()
            if pruned == 0 and any(PRUNED_TEXT in line for line in new):
                self._scan_seconds = time.monotonic() - watching
            pruned += sum(PRUNED_TEXT in line for line in new)
            if pruned >= target or any("pass done" in line for line in new):
                return
            time.sleep(0.001)

    def _check_lock_holder(self, index: int, folder: Path, pid: int, role: str) -> None:
        try:
            holder = (folder / LOCK_NAME).read_text().strip()
        except FileNotFoundError:
            self._problem(f"trial {index}: no lock file after the {role}")
            return
        if holder != str(pid):
            self._problem(f"trial {index}: lock file names {holder!r}, the {role} was {pid}")

    def _check_log(self, index: int, lines: list[str]) -> None:
        for line in lines:
            if " ERROR " in line or "Traceback" in line or "another watcher" in line:
                self._problem(f"trial {index}: watcher log: {line}")

    def _problem(self, text: str) -> None:
        self.report.problems.append(text)


def snapshot_names(layout: Layout) -> set[str]:
    return set(layout.files) | set(layout.links) | set(layout.directories)


def run_watcher_crashes(
    work: Path,
    spec: FolderSpec,
    trials: int,
    seed: int = 0,
    keep: bool = False,
    options: list[str] | None = None,
) -> WatcherCrashReport:
    """Run `trials` trials in a new folder `work` and return the report."""
    try:
        return WatcherCrashTrials(work, spec, seed, options).run(trials, keep_folders=keep)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
