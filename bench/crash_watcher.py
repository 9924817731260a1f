"""Kill the watcher daemon with SIGKILL in the middle of passes over a large folder.

Run from the repository root: `python bench/crash_watcher.py --trials 20`. It prints the
counts and exits with status 1 if any check failed. The trials and their checks are in
tests/helpers_crash_watcher.py, which tests/test_crashes.py runs with fewer trials in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers_crash_watcher import FolderSpec, WatcherCrashReport, run_watcher_crashes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="folders built (default 20)")
    parser.add_argument("--series", type=int, default=4, help="series in the folder (default 4)")
    parser.add_argument(
        "--per-series", type=int, default=5000, help="checkpoints per series (default 5000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--tmp", default="/tmp", help="parent of the work folder (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the trial folders and logs")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    return parser.parse_args(argv)


def describe(report: WatcherCrashReport, spec: FolderSpec, trials: int, seed: int) -> list[str]:
    first = [kill for kill in report.kills if kill.number == 1]
    lines = [
        f"## Watcher SIGKILL trials: {report.trials} of {trials} (seed {seed})",
        "",
        (
            f"folder: {report.entries} entries, {report.checkpoints} checkpoints in {spec.series} "
            f"series; the policy ({' '.join(spec.options())}) prunes {report.expected_prune}"
        ),
        (
            f"kills: {len(report.kills)} ({len(first)} first kills, "
            f"{len(report.kills) - len(first)} kills of a restarted watcher)"
        ),
        "",
        "| phase at the kill | kills |",
        "|---|---|",
    ]
    lines += [f"| {phase} | {count} |" for phase, count in report.phase_counts().items()]
    lines.append("")
    return lines + describe_figures(report, first)


def describe_figures(report: WatcherCrashReport, first: list) -> list[str]:
    lines = []
    deleted = [kill.deleted for kill in first]
    if deleted:
        lines.append(
            f"- files deleted before a first kill: min {min(deleted)}, median "
            f"{statistics.median(deleted):.0f}, max {max(deleted)}"
        )
    lines.append(
        f"- uninterrupted --once run on the reference copy: {report.reference_seconds:.2f} s"
    )
    passes = report.final_pass_ms
    if passes:
        lines.append(
            f"- pass of the restarted watcher: min {min(passes):.0f} ms, median "
            f"{statistics.median(passes):.0f} ms, max {max(passes):.0f} ms"
        )
    if report.build_seconds:
        lines.append(f"- folder build: median {statistics.median(report.build_seconds):.2f} s")
    lines.append(f"- whole run: {report.seconds:.0f} s")

    lines.append(f"- problems: {len(report.problems)}")
    lines += [f"  - {problem}" for problem in report.problems]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = FolderSpec(series=args.series, per_series=args.per_series)
    work = Path(tempfile.mkdtemp(prefix="crash-watcher-", dir=args.tmp)) / "work"
    report = run_watcher_crashes(work, spec, args.trials, seed=args.seed, keep=args.keep)
    print("\n".join(describe(report, spec, args.trials, args.seed)))
    if args.keep:
        print(f"\nwork folder kept: {work}")
    else:
        work.parent.rmdir()
    if args.json is not None:
        payload = {"trials": args.trials, "seed": args.seed, "spec": asdict(spec), **asdict(report)}
        args.json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return 1 if report.problems or report.trials < args.trials else 0


if __name__ == "__main__":
    sys.exit(main())
