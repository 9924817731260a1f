"""One retention pass over a folder: scan, check validity, plan, prune, summarise."""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from watcher.config import Policy
from watcher.policy import plan_retention
from watcher.prune import execute_plan
from watcher.scan import NameMatcher, scan_folder
from watcher.validity import ValidityCache, stat_key

log = logging.getLogger(__name__)


class FolderError(OSError):
    """The checkpoint folder is missing, not a folder, or cannot be opened."""


def open_folder(path: os.PathLike | str) -> int:
    """Open the checkpoint folder and return a handle for scanning and deleting relative to it."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FolderError(
            errno.ENOENT, f"checkpoint folder {str(path)!r} not found: check DIR or 'directory'"
        ) from None
    except NotADirectoryError:
        raise FolderError(
            errno.ENOTDIR, f"{str(path)!r} is not a folder: DIR must name the checkpoint folder"
        ) from None
    except OSError as error:
        raise FolderError(
            error.errno, f"cannot open checkpoint folder {str(path)!r}: {error.strerror}"
        ) from None


@dataclass(frozen=True)
class PassSummary:
    checkpoints: int
    kept: int
    pruned: int
    bytes_freed: int
    invalid: int
    skipped: int
    failed: int
    seconds: float
    dry_run: bool

    def describe(self) -> str:
        verb = "would prune" if self.dry_run else "pruned"
        freed = "would free" if self.dry_run else "freed"
        text = (
            f"pass done in {self.seconds * 1000:.1f} ms: {self.checkpoints} checkpoints, "
            f"{self.kept} kept, {verb} {self.pruned}, {freed} {format_bytes(self.bytes_freed)}"
        )
        if self.invalid:
            text += f", {self.invalid} invalid kept"
        if self.skipped:
            text += f", {self.skipped} changed or gone since the scan"
        if self.failed:
            text += f", {self.failed} failed to delete"
        return text


class Pruner:
    """Run retention passes for one policy, remembering validity verdicts between passes."""

    def __init__(self, policy: Policy, report: Callable[[str], None] | None = None) -> None:
        self.policy = policy
        self.report = report
        self.matcher = NameMatcher(policy.pattern)
        self.cache = ValidityCache()
        self._reported_invalid: set[tuple] = set()

    def run(self, dir_fd: int) -> PassSummary:
        started = time.monotonic()
        listing = scan_folder(dir_fd, self.matcher)
        checkpoints = listing.checkpoints
        verdicts = {
            entry.name: self.cache.check(dir_fd, entry.name, entry.stat) for entry in checkpoints
        }
        self._report_invalid(checkpoints, verdicts)
        self.cache.forget_missing({stat_key(entry.stat) for entry in checkpoints})

        plan = plan_retention(checkpoints, verdicts, listing.link_targets, self.policy)
        for decision in plan.kept:
            log.debug(
                "keep %r (step %s): %s", decision.entry.name, decision.entry.step, decision.reason
            )
        result = execute_plan(plan, dir_fd, self.policy.dry_run, self.report)
        invalid = sum(1 for verdict in verdicts.values() if not verdict.valid)
        return PassSummary(
            checkpoints=len(checkpoints),
            kept=len(plan.kept),
            pruned=result.pruned,
            bytes_freed=result.bytes_freed,
            invalid=invalid,
            skipped=result.skipped,
            failed=result.failed,
            seconds=time.monotonic() - started,
            dry_run=self.policy.dry_run,
        )

    def _report_invalid(self, checkpoints, verdicts) -> None:
        """Log each invalid file once per version of it, so a file being written does not flood."""
        reported = set()
        for entry in checkpoints:
            verdict = verdicts[entry.name]
            if verdict.valid:
                continue
            key = stat_key(entry.stat)
            reported.add(key)
            if key not in self._reported_invalid:
                log.info("invalid, kept and not counted: %r (%s)", entry.name, verdict.reason)
        self._reported_invalid = reported


def format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
