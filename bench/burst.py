"""A burst of checkpoints: 1,000 atomic saves in one second, then the time to the right set.

Each save writes a small real torch file under a dot-named temp name and renames it into
place, one every millisecond. The watcher daemon (--keep-last 2 --keep-every 100) must end with
the milestones (steps divisible by 100) and steps 998 and 999. The in-loop alternatives run
their retention after each rename and keep the newest 2, so they must end with 999 and 1000.

This script tracks the folder with its own inotify watch (IN_MOVED_TO, IN_DELETE,
IN_MOVED_FROM), reading events between saves during the burst and continuously after it. The
watcher renames a checkpoint to a hidden name before it unlinks it, so a rename away counts as
a removal. The convergence time runs from the last rename to the read of the event that makes
the set of checkpoint names exactly the expected set, and a final listing confirms it. Events
are stamped when read, so the figure can be late by one read of the queue, well under a
millisecond at these rates.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import alternatives
import benchlib as lib

KEEP = 2
MILESTONE_EVERY = 100
TIMEOUT = 30.0
OWN_PATTERN = f"model_v2_step*_{lib.RUN}_s0.pt"


class FolderTracker:
    """The set of checkpoint names in a folder, kept up to date from inotify events."""

    def __init__(self, folder: Path) -> None:
        self.names: set[str] = set()
        self.high_water = 0
        self.watch = lib.Inotify(folder, lib.IN_MOVED_TO | lib.IN_DELETE | lib.IN_MOVED_FROM)

    def update(self, timeout: float) -> float | None:
        """Apply the pending events; return the read time, or None when nothing came."""
        events = self.watch.read(timeout)
        for _when, mask, name in events:
            if name.startswith("."):
                continue
            if mask & lib.IN_MOVED_TO:
                self.names.add(name)
                self.high_water = max(self.high_water, len(self.names))
            elif mask & (lib.IN_DELETE | lib.IN_MOVED_FROM):
                # The watcher renames a checkpoint to a hidden name just before deleting it.
                self.names.discard(name)
        return events[0][0] if events else None

    def close(self) -> None:
        self.watch.close()


def expected_names(count: int, milestones: bool) -> set[str]:
    if not milestones:
        return {lib.checkpoint_name(step) for step in range(count - KEEP + 1, count + 1)}
    kept = {step for step in range(1, count + 1) if step % MILESTONE_EVERY == 0}
    ordinary = [step for step in range(count, 0, -1) if step % MILESTONE_EVERY != 0]
    kept.update(ordinary[:KEEP])
    return {lib.checkpoint_name(step) for step in kept}


def run_burst(folder: Path, count: int, seconds: float, data: bytes, retention) -> dict:
    """Save `count` checkpoints evenly over `seconds`; return timings and the high-water mark."""
    tracker = FolderTracker(folder)
    interval = seconds / count
    started = time.perf_counter()
    last_rename = started
    try:
        for step in range(1, count + 1):
            slot = started + (step - 1) * interval
            while time.perf_counter() < slot:
                tracker.update(0)
            name = lib.checkpoint_name(step)
            last_rename = lib.save_atomically(folder, name, data)
            if retention is not None:
                retention(folder / name)
        burst_seconds = time.perf_counter() - started
        return {"burst_seconds": burst_seconds, "last_rename": last_rename, "tracker": tracker}
    except BaseException:
        tracker.close()
        raise


def converge(tracker: FolderTracker, expected: set[str], last_rename: float) -> float | None:
    """Read events until the tracked set equals `expected`; return the time after last_rename."""
    deadline = last_rename + TIMEOUT
    if tracker.names == expected:
        return time.perf_counter() - last_rename
    while time.perf_counter() < deadline:
        when = tracker.update(deadline - time.perf_counter())
        if when is not None and tracker.names == expected:
            return when - last_rename
    return None


def listed_names(folder: Path) -> set[str]:
    return {name for name in os.listdir(folder) if not name.startswith(".")}


class Variant:
    """One retention method, each burst in a fresh folder under `parent`."""

    def __init__(self, name: str, parent: Path, count: int, seconds: float, data: bytes) -> None:
        self.name = name
        self.parent = parent
        self.count = count
        self.seconds = seconds
        self.data = data
        self.runs = 0
        self.errors: list[str] = []
        self.high_water: list[int] = []
        self.burst_seconds: list[float] = []

    def _folder(self) -> Path:
        self.runs += 1
        folder = self.parent / f"{self.name.split()[0].strip(':')}-{self.runs}"
        folder.mkdir()
        return folder

    def _retention(self, folder: Path):
        if self.name.startswith("in-loop"):
            return lambda _path: alternatives.glob_and_sort(folder, OWN_PATTERN, KEEP)
        if self.name.startswith("framework"):
            return alternatives.SavedList(KEEP).after_save
        return None

    def run(self) -> float:
        folder = self._folder()
        milestones = self.name == "watcher"
        expected = expected_names(self.count, milestones)
        daemon = None
        if milestones:
            daemon = lib.Daemon(
                folder,
                "--keep-last",
                str(KEEP),
                "--keep-every",
                str(MILESTONE_EVERY),
                log_dir=self.parent,
            )
            daemon.wait_for_log("pass done")
        try:
            burst = run_burst(folder, self.count, self.seconds, self.data, self._retention(folder))
            tracker = burst["tracker"]
            try:
                elapsed = converge(tracker, expected, burst["last_rename"])
                time.sleep(0.5)  # anything still deleting would show in the listing below
                tracker.update(0)
            finally:
                tracker.close()
            self.high_water.append(tracker.high_water)
            self.burst_seconds.append(burst["burst_seconds"])
            final = listed_names(folder)
            if elapsed is None:
                self.errors.append(f"no convergence within {TIMEOUT} s ({len(final)} files)")
                return TIMEOUT
            if final != expected:
                self.errors.append(f"final listing differs: {sorted(final ^ expected)[:5]}")
            return elapsed
        finally:
            if daemon is not None:
                daemon.stop()


def cron_after_burst(parent: Path, count: int, data: bytes, rounds: int) -> dict:
    """Time the cron pipeline on the folder a burst leaves when nothing prunes during it."""
    times = []
    for index in range(rounds):
        folder = parent / f"cron-{index}"
        folder.mkdir()
        base_ns = time.time_ns() - 10**12
        for step in range(1, count + 1):
            lib.write_bytes(folder / lib.checkpoint_name(step), data, base_ns + step * 1000)
        started = time.perf_counter()
        alternatives.run_cron(folder, OWN_PATTERN, KEEP)
        times.append(time.perf_counter() - started)
    return lib.summarize(times)


def main(argv=None) -> int:
    args = lib.parse_args(__doc__.splitlines()[0], argv)
    count, seconds = (100, 0.1) if args.quick else (1000, 1.0)
    rounds = 1 if args.quick else 10
    data = lib.small_checkpoint_bytes()
    with lib.bench_folder(args.tmp, "burst") as parent:
        machine = lib.machine_info(parent)
        variants = [
            Variant(name, parent, count, seconds, data)
            for name in ("watcher", "in-loop glob+mtime sort", "framework: saved list")
        ]
        samples = lib.interleave({variant.name: variant.run for variant in variants}, rounds)
        cron = cron_after_burst(parent, count, data, rounds)

    summaries = {name: lib.summarize(values) for name, values in samples.items()}
    errors = {variant.name: variant.errors for variant in variants if variant.errors}
    watcher = summaries["watcher"]
    targets = {
        "watcher converges within 2 s (every burst)": not errors.get("watcher")
        and watcher["max"] < 2.0,
    }
    results = {
        "machine": machine,
        "quick": args.quick,
        "count": count,
        "seconds": seconds,
        "rounds": rounds,
        "summaries": summaries,
        "burst_seconds": {v.name: lib.summarize(v.burst_seconds) for v in variants},
        "high_water": {v.name: max(v.high_water) for v in variants},
        "cron_pipeline_after_burst": cron,
        "errors": errors,
        "targets": targets,
    }
    lines = [
        f"## Burst: {count} checkpoints in {seconds:g} s",
        "",
        (
            f"{rounds} bursts per variant, interleaved; time from the last rename to the folder "
            "holding exactly the expected set."
        ),
        "",
        lib.table_ms(summaries, "watcher"),
        "",
        "| variant | burst duration median s | most checkpoints present at once |",
        "|---|---|---|",
    ]
    for variant in variants:
        lines.append(
            f"| {variant.name} | {results['burst_seconds'][variant.name]['median']:.3f} | "
            f"{results['high_water'][variant.name]} |"
        )
    lines += [
        "",
        (
            f"A cron job sees all {count} files at its next tick; its pipeline then takes "
            f"{lib.format_ms(cron['median'])} ms (median of {cron['n']})."
        ),
        "",
    ]
    lines += [f"- {name}: {'met' if met else 'MISSED'}" for name, met in targets.items()]
    if errors:
        lines += ["", f"Errors: {errors}"]
    lib.write_results("burst", results, "\n".join(lines))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
