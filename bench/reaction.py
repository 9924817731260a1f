"""Reaction time: from the rename that completes a checkpoint to the deletion it causes.

Each variant gets its own folder with the same content: the newest two checkpoints of the
measured series (run RUN, seed 0) and a number of resident checkpoints that must stay: steps
divisible by 1000 of another run. The watcher keeps them as milestones (--keep-every 1000); the
alternatives glob only their own run's names, so they list the residents but never match them.

One push writes step s as a dot-named temp file, renames it into place, and waits until step
s-2 leaves its name, seen by this script's own inotify watch. The watcher renames a checkpoint
to a hidden name just before it unlinks it (IN_MOVED_FROM), and the alternatives unlink it
(IN_DELETE). Variants and folder sizes are interleaved push by push. The in-loop and
framework methods run their retention in this process right after the rename, as a training
loop would. The cron variant also runs its pipeline right after the rename, so its figure is
the pipeline's cost alone. A real cron job adds a wait for its next tick, uniform over the
period, so half a period on average.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import alternatives
import benchlib as lib

KEEP = 2
MILESTONE_EVERY = 1000
RESIDENT_RUN = "20250101_000000"
OWN_PATTERN = f"model_v2_step*_{lib.RUN}_s0.pt"
TIMEOUT = 5.0
PROFILED_PASSES = 5
"""Passes run under cProfile after the timed ones, so the profiler does not skew the times."""


def build_folder(folder: Path, residents: int, data: bytes) -> None:
    """Write the residents, then steps 1 and 2 of the measured series, with rising mtimes."""
    base_ns = time.time_ns() - 10**12
    for index in range(residents):
        name = lib.checkpoint_name((index + 1) * MILESTONE_EVERY, RESIDENT_RUN, 1)
        lib.write_bytes(folder / name, data, base_ns + index * 1000)
    for step in (1, 2):
        lib.write_bytes(folder / lib.checkpoint_name(step), data)


class Pusher:
    """Push checkpoints into one folder and time each push until the pushed-out file is gone."""

    def __init__(self, folder: Path, data: bytes, retention) -> None:
        self.folder = folder
        self.data = data
        self.retention = retention
        self.step = 2
        # The watcher takes a name away by renaming it to a hidden name before the unlink, and
        # the other methods unlink it: either event marks the moment the checkpoint is gone.
        self.watch = lib.Inotify(folder, lib.IN_DELETE | lib.IN_MOVED_FROM)
        self.failures = 0

    def push(self) -> float:
        self.watch.drain()
        self.step += 1
        name = lib.checkpoint_name(self.step)
        started = lib.save_atomically(self.folder, name, self.data)
        if self.retention is not None:
            self.retention(self.folder / name)
        deleted_at = self.watch.wait_for(
            lib.IN_DELETE | lib.IN_MOVED_FROM, lib.checkpoint_name(self.step - KEEP), TIMEOUT
        )
        if deleted_at is None:
            self.failures += 1
            return TIMEOUT
        return deleted_at - started


def make_retention(kind: str, folder: Path):
    """Return the callable run after each rename for one variant, or None for the watcher."""
    if kind == "watcher":
        return None
    if kind == "in-loop glob+mtime sort":
        return lambda _path: alternatives.glob_and_sort(folder, OWN_PATTERN, KEEP)
    if kind == "framework: glob+step sort":
        return lambda _path: alternatives.step_sorted_glob(folder, OWN_PATTERN, KEEP)
    if kind == "framework: saved list":
        saved = alternatives.SavedList(KEEP, [folder / lib.checkpoint_name(s) for s in (1, 2)])
        return saved.after_save
    if kind == "cron pipeline (run only)":
        return lambda _path: alternatives.run_cron(folder, OWN_PATTERN, KEEP)
    raise ValueError(f"unknown variant {kind!r}")


KINDS = (
    "watcher",
    "in-loop glob+mtime sort",
    "framework: glob+step sort",
    "framework: saved list",
    "cron pipeline (run only)",
)


def inotify_resolution(parent: Path, samples: int) -> dict:
    """Time from unlink() returning to this script reading the IN_DELETE event."""
    folder = parent / "resolution"
    folder.mkdir()
    watch = lib.Inotify(folder, lib.IN_DELETE)
    delays = []
    for index in range(samples):
        path = folder / f"f{index}"
        path.write_bytes(b"x")
        watch.drain()
        os.unlink(path)
        started = time.perf_counter()
        delays.append(watch.wait_for(lib.IN_DELETE, path.name, TIMEOUT) - started)
    watch.close()
    return lib.summarize(delays)


PASS_KINDS = ("over the changed name (run_changed)", "over the folder (run)")


def pass_times(
    parent: Path, residents: int, data: bytes, passes: int, kind: str
) -> tuple[dict, str]:
    """Time one kind of pass in this process on a warmed folder, one new checkpoint per pass.

    The daemon handles an event with a pass over the names it carries (Pruner.run_changed), and
    lists the whole folder (Pruner.run) at start, on a rescan and when a symlink changes. Returns
    the summary of the timed passes and a cProfile listing of PROFILED_PASSES more.
    """
    from watcher.config import build_policy
    from watcher.passes import Pruner, open_folder

    folder = parent / f"inprocess-{residents}-{PASS_KINDS.index(kind)}"
    folder.mkdir()
    build_folder(folder, residents, data)
    time.sleep(1.1)  # let the residents age past the validity cache's settle time
    policy = build_policy(
        {"directory": str(folder), "keep_last": KEEP, "keep_every": MILESTONE_EVERY}
    )
    pruner = Pruner(policy)
    dir_fd = open_folder(folder)
    pruner.run(dir_fd)
    profile = cProfile.Profile()
    times = []
    try:
        for step in range(3, 3 + passes + PROFILED_PASSES):
            lib.save_atomically(folder, lib.checkpoint_name(step), data)
            profiled = step >= 3 + passes
            started = time.perf_counter()
            if profiled:
                profile.enable()
            if kind == PASS_KINDS[0]:
                summary = pruner.run_changed(dir_fd, {lib.checkpoint_name(step)})
            else:
                summary = pruner.run(dir_fd)
            if profiled:
                profile.disable()
            else:
                times.append(time.perf_counter() - started)
            if summary.pruned != 1:
                raise RuntimeError(f"expected one file pruned, got {summary.describe()}")
    finally:
        os.close(dir_fd)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(25)
    return lib.summarize(times), text.getvalue()


def main(argv=None) -> int:
    args = lib.parse_args(__doc__.splitlines()[0], argv)
    sizes = {"10": 8, "500": 498} if args.quick else {"10": 8, "10000": 9998}
    rounds = 8 if args.quick else 300
    gap = 0.01 if args.quick else 0.03
    data = lib.small_checkpoint_bytes()
    lib.require_free_disk(args.tmp, len(sizes) * len(KINDS) * 10_000 * 4096)

    with lib.bench_folder(args.tmp, "reaction") as parent:
        machine = lib.machine_info(parent)
        pushers: dict[str, Pusher] = {}
        daemons = []
        for size, residents in sizes.items():
            for kind in KINDS:
                folder = parent / f"{kind.split(':')[0].split()[0]}-{len(pushers)}"
                folder.mkdir()
                build_folder(folder, residents, data)
                pushers[f"{kind} ({size} files)"] = Pusher(
                    folder, data, make_retention(kind, folder)
                )
        time.sleep(1.1)  # let the residents age past the validity cache's settle time
        try:
            for key, pusher in pushers.items():
                if key.startswith("watcher"):
                    daemon = lib.Daemon(
                        pusher.folder,
                        "--keep-last",
                        str(KEEP),
                        "--keep-every",
                        str(MILESTONE_EVERY),
                        log_dir=parent,
                    )
                    daemons.append(daemon)
                    daemon.wait_for_log("pass done")

            def timed(pusher: Pusher):
                def run() -> float:
                    result = pusher.push()
                    time.sleep(gap)
                    return result

                return run

            variants = {key: timed(pusher) for key, pusher in pushers.items()}
            lib.interleave(variants, 3)  # warm-up, not recorded
            samples = lib.interleave(variants, rounds)
        finally:
            for daemon in daemons:
                daemon.stop()
        failures = {key: pusher.failures for key, pusher in pushers.items()}
        for pusher in pushers.values():
            pusher.watch.close()
        resolution = inotify_resolution(parent, 50 if args.quick else 300)
        in_process = {}
        profiles = {}
        for size, residents in sizes.items():
            for kind in PASS_KINDS:
                key = f"{size} files, pass {kind}"
                in_process[key], profiles[key] = pass_times(
                    parent, residents, data, 5 if args.quick else 100, kind
                )

    summaries = {key: lib.summarize(values) for key, values in samples.items()}
    small, large = sizes
    watcher_small = summaries[f"watcher ({small} files)"]
    watcher_large = summaries[f"watcher ({large} files)"]
    targets = {
        f"median < 10 ms ({small} files)": watcher_small["median"] < 0.010,
        f"p99 < 50 ms ({small} files)": watcher_small["p99"] < 0.050,
        f"median < 10 ms ({large} files)": watcher_large["median"] < 0.010,
        f"p99 < 50 ms ({large} files)": watcher_large["p99"] < 0.050,
        f"{large}-file median within 2x of {small}-file": lib.ratio(watcher_large, watcher_small)
        <= 2.0,
    }
    results = {
        "machine": machine,
        "quick": args.quick,
        "rounds": rounds,
        "gap_seconds": gap,
        "summaries": summaries,
        "failures": failures,
        "inotify_resolution": resolution,
        "pass_in_process": in_process,
        "targets": targets,
    }
    lines = [
        "## Reaction time (rename to deletion)",
        "",
        (
            f"{rounds} pushes per variant, interleaved; detection by inotify IN_DELETE or "
            f"IN_MOVED_FROM, resolution median {lib.format_ms(resolution['median'])} ms "
            f"(p99 {lib.format_ms(resolution['p99'])} ms)."
        ),
        "",
    ]
    for size in sizes:
        rows = {key: value for key, value in summaries.items() if key.endswith(f"({size} files)")}
        lines += [f"### {size} checkpoints in the folder", "", lib.table_ms(rows, next(iter(rows)))]
        lines += [""]
    lines += ["### Watcher pass in-process (one new checkpoint per pass)", ""]
    lines += [lib.table_ms(in_process), ""]
    lines += [f"- {name}: {'met' if met else 'MISSED'}" for name, met in targets.items()]
    if any(failures.values()):
        lines += ["", f"Pushes with no deletion within {TIMEOUT} s: {failures}"]
    lib.write_results("reaction", results, "\n".join(lines))
    (lib.RESULTS / "reaction-profile.txt").write_text(
        "\n".join(f"## {key}\n{text}" for key, text in profiles.items())
    )
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
