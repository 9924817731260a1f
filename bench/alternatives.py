"""The retention methods users pick instead of the watcher, written out so they can be timed.

- glob_and_sort: retention inside the training loop. Glob the folder, sort by file time, delete
  all but the newest `keep`.
- cron_command: the shell pipeline a cron job runs; the job's period adds up to one period of
  delay, which no measurement here waits for.
- step_sorted_glob: what a framework's "keep the last N checkpoints" setting does after each save
  when it finds its checkpoints on disk. It globs, orders by the step parsed from the name and
  deletes the oldest. The Hugging Face Trainer's save_total_limit works this way on its
  checkpoint folders.
- SavedList: what a framework does when it remembers the files it saved itself: a list in
  memory, and one delete per save with no listing (PyTorch Lightning's ModelCheckpoint with
  save_top_k keeps its files in memory this way).

These are this project's own short versions of those methods, not the frameworks' code.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
from collections import deque
from pathlib import Path

_STEP = re.compile(r"step(\d+)")


def glob_and_sort(folder: Path, pattern: str, keep: int) -> int:
    """Delete all but the `keep` newest files by mtime among `folder/pattern`; return how many."""
    files = glob.glob(os.path.join(glob.escape(str(folder)), pattern))
    files.sort(key=os.path.getmtime)
    doomed = files[:-keep] if keep else files
    for path in doomed:
        os.remove(path)
    return len(doomed)


def step_sorted_glob(folder: Path, pattern: str, keep: int) -> int:
    """Delete all but the `keep` highest steps (parsed from names) among `folder/pattern`."""
    files = glob.glob(os.path.join(glob.escape(str(folder)), pattern))
    ordered = sorted(files, key=lambda path: int(_STEP.search(os.path.basename(path))[1]))
    doomed = ordered[:-keep] if keep else ordered
    for path in doomed:
        os.remove(path)
    return len(doomed)


def cron_command(folder: Path, pattern: str, keep: int) -> str:
    """Return the cron job's pipeline: newest by mtime kept, the rest removed."""
    return (
        f"find {shlex.quote(str(folder))} -name {shlex.quote(pattern)} -printf '%T@ %p\\n' "
        f"| sort -n | head -n -{keep} | cut -d' ' -f2- | xargs -r rm"
    )


def run_cron(folder: Path, pattern: str, keep: int) -> None:
    subprocess.run(["sh", "-c", cron_command(folder, pattern, keep)], check=True)


class SavedList:
    """Remember saved paths in order; after each save, delete the oldest beyond `keep`."""

    def __init__(self, keep: int, saved: list[Path] | None = None) -> None:
        self.keep = keep
        self.saved: deque[Path] = deque(saved or [])

    def after_save(self, path: Path) -> int:
        self.saved.append(path)
        removed = 0
        while len(self.saved) > self.keep:
            os.remove(self.saved.popleft())
            removed += 1
        return removed


def bare_scan(folder: Path, keep: int) -> int:
    """List the folder once, keep the `keep` highest steps of names with a step, delete the rest.

    The floor for any one-shot pruner: one listing and one unlink per pruned file, no stat,
    no validity check and no series.
    """
    stepped = []
    with os.scandir(folder) as listing:
        for entry in listing:
            found = _STEP.search(entry.name)
            if found is not None and entry.name.endswith(".pt"):
                stepped.append((int(found[1]), entry.name))
    stepped.sort()
    doomed = stepped[:-keep] if keep else stepped
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _step, name in doomed:
            os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    return len(doomed)
