"""Carry out a retention plan: delete relative to an open handle on the folder, never via a link."""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field

from watcher.policy import Decision, Plan

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    pruned: int = 0
    bytes_freed: int = 0
    skipped: int = 0
    """Files left in place because they changed or vanished since the scan."""
    failures: list[tuple[Decision, str]] = field(default_factory=list)
    """Deletions that failed, with the error, for the caller to report."""

    @property
    def failed(self) -> int:
        return len(self.failures)


def execute_plan(plan: Plan, dir_fd: int, dry_run: bool) -> PruneResult:
    """Delete each file the plan prunes, logging the file, its step, series, reason and size.

    A file that is gone already is skipped quietly, one that changed since the scan is left for the
    next pass, and a failed deletion is recorded in the result and the rest of the plan still runs.
    A dry run deletes nothing and only counts what would go.
    """
    result = PruneResult()
    for decision in plan.pruned:
        if dry_run:
            result.pruned += 1
            result.bytes_freed += decision.entry.stat.st_size
            continue
        _prune_one(decision, dir_fd, result)
    return result


def _prune_one(decision: Decision, dir_fd: int, result: PruneResult) -> None:
    entry = decision.entry
    try:
        current = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        log.info("already gone, nothing to prune: %r", entry.name)
        result.skipped += 1
        return
    except OSError as error:
        result.failures.append((decision, f"cannot check it before deleting: {error}"))
        return
    if not _unchanged(entry.stat, current):
        # Another name or another file now sits under this name (a link swapped in, or a rewrite):
        # the plan no longer applies to it, so the next pass decides afresh.
        log.warning("%r changed since the scan, left in place for the next pass", entry.name)
        result.skipped += 1
        return

    # NOTE: Linux has no unlink-by-handle, so a swap between the check above and this call can
    # still remove the swapped-in name. unlink never follows a link, so no target is ever deleted.
    try:
        os.unlink(entry.name, dir_fd=dir_fd)
    except FileNotFoundError:
        log.info("already gone, nothing to prune: %r", entry.name)
        result.skipped += 1
        return
    except OSError as error:
        text = str(error)
        if error.errno in (errno.EPERM, errno.EACCES):
            text += (
                "; the watcher needs write permission on the folder, and in a sticky folder "
                "(mode +t) only the file's owner may delete it"
            )
        result.failures.append((decision, text))
        return
    log.info("pruned %s", describe_decision(decision))
    result.pruned += 1
    result.bytes_freed += entry.stat.st_size


def _unchanged(before: os.stat_result, now: os.stat_result) -> bool:
    return (
        stat.S_ISREG(now.st_mode)
        and (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino)
        and now.st_size == before.st_size
        and now.st_mtime_ns == before.st_mtime_ns
    )


def describe_decision(decision: Decision) -> str:
    entry = decision.entry
    return (
        f"{entry.name!r} (step {entry.step}, series {entry.series!r}, "
        f"{entry.stat.st_size} bytes): {decision.reason}"
    )
