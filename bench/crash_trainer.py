"""Kill the trainer with SIGKILL many times while a watcher daemon prunes its folder.

Run from the repository root: `python bench/crash_trainer.py --trials 200`. It prints the
counts and exits with status 1 if any check failed. The trials and their checks are in
tests/helpers_crash_trainer.py, which tests/test_crashes.py runs with fewer trials in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers_crash import percentile
from helpers_crash_trainer import (
    KEEP_EVERY,
    KEEP_LAST,
    MODES,
    PHASES,
    TrainerCrashReport,
    run_trainer_crashes,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="SIGKILLs (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--tmp", default="/tmp", help="parent of the work folder (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and its logs")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    return parser.parse_args(argv)


def describe(report: TrainerCrashReport, trials: int, seed: int) -> list[str]:
    lines = [
        f"## Trainer SIGKILL trials: {len(report.trials)} of {trials} (seed {seed})",
        "",
        (
            f"watcher daemon: --keep-last {KEEP_LAST} --keep-every {KEEP_EVERY}; "
            "the trainer saves every step"
        ),
        "",
        "| phase at the kill | " + " | ".join(MODES) + " | all |",
        "|---" * (len(MODES) + 2) + "|",
    ]
    for phase in PHASES:
        counts = [sum(t.phase == phase and t.mode == mode for t in report.trials) for mode in MODES]
        lines.append(f"| {phase} | " + " | ".join(map(str, counts)) + f" | {sum(counts)} |")
    totals = [report.mode_counts()[mode] for mode in MODES]
    lines.append("| all | " + " | ".join(map(str, totals)) + f" | {sum(totals)} |")
    lines.append("")
    return lines + describe_checks(report) + describe_timings(report)


def describe_checks(report: TrainerCrashReport) -> list[str]:
    lines = [
        f"- resumes checked (the log names the newest step left): {report.resumes_checked}",
        f"- validity checks of files under a checkpoint name: {report.validity_checks}",
        f"- torch.load(weights_only=True) of the newest files after kills: {report.loads_checked}",
    ]
    lines.append(
        f"- stray temp files left by SIGKILL: {len(report.stray_temps)}; at the end each was "
        "checked to be outside the checkpoint pattern and removed by the next trainer start"
    )
    lines.append(
        f"- checkpoint files at the end: {report.checkpoint_files_at_end} "
        f"({report.milestones_at_end} milestones); the watcher counted {report.watcher_counted}"
    )
    return lines


def describe_timings(report: TrainerCrashReport) -> list[str]:
    lines = []
    kill_ms = [trial.kill_after_ms for trial in report.trials]
    trial_seconds = [trial.seconds for trial in report.trials]
    if kill_ms:
        lines.append(
            f"- kill time after training started: min {min(kill_ms):.1f} ms, median "
            f"{statistics.median(kill_ms):.1f} ms, max {max(kill_ms):.1f} ms"
        )
        lines.append(
            f"- seconds per trial: median {statistics.median(trial_seconds):.2f}, p90 "
            f"{percentile(trial_seconds, 0.9):.2f}; whole run {report.seconds:.0f} s"
        )

    lines.append(f"- problems: {len(report.problems)}")
    lines += [f"  - {problem}" for problem in report.problems]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="crash-trainer-", dir=args.tmp)) / "work"
    started = time.monotonic()
    report = run_trainer_crashes(work, args.trials, seed=args.seed, keep=args.keep)
    print("\n".join(describe(report, args.trials, args.seed)))
    if args.keep:
        print(f"\nwork folder kept: {work}")
    else:
        work.parent.rmdir()
    if args.json is not None:
        payload = {"trials": args.trials, "seed": args.seed, **asdict(report)}
        payload["wall_seconds"] = time.monotonic() - started
        args.json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return 1 if report.problems or len(report.trials) < args.trials else 0


if __name__ == "__main__":
    sys.exit(main())
