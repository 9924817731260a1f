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
from watcher.prune import PRUNING_PREFIX, describe_decision, execute_plan, restore_interrupted
from watcher.scan import Entry, Kind, NameMatcher, scan_folder
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


LINK_GRACE = 60.0
"""Seconds a checkpoint stays protected after the last symlink to it disappears. Tools that refresh
`best.pt` by deleting and recreating it leave a moment with no link, and a pass that runs in that
moment must not prune the target."""


class Pruner:
    """Run retention passes for one policy, remembering what earlier passes saw.

    Between passes it keeps validity verdicts, recent symlink targets, and the newest arrival of
    each series. In the first pass nothing counts as an arrival, so a single pass (--once) follows
    the step order alone. `invalid_report_delay` is how long an invalid file must stay unchanged
    before it is reported as a warning; 0 reports it at once, as a one-shot run wants.
    """

    def __init__(
        self,
        policy: Policy,
        report: Callable[[str], None] | None = None,
        invalid_report_delay: float = 0.0,
    ) -> None:
        self.policy = policy
        self.report = report or (lambda message: log.info("%s", message))
        self.matcher = NameMatcher(policy.pattern)
        self.cache = ValidityCache()
        self.invalid_report_delay = invalid_report_delay
        self._passes = 0
        self._links: dict[tuple[int, int], tuple[tuple[str, ...], float]] = {}
        self._valid_seen: set[tuple[str, int]] = set()
        self._arrivals: dict[str, tuple[int, int, str]] = {}
        self._invalid_since: dict[str, tuple[tuple, float, bool]] = {}
        self._reported: set[tuple] = set()
        self._warned_no_match = False

    def replace_policy(self, policy: Policy) -> None:
        """Apply a reloaded policy, keeping what earlier passes saw unless the pattern changed."""
        if policy.pattern != self.policy.pattern:
            self.matcher = NameMatcher(policy.pattern)
            self._valid_seen.clear()
            self._arrivals.clear()
        self.policy = policy

    def run(self, dir_fd: int) -> PassSummary:
        started = time.monotonic()
        listing = scan_folder(dir_fd, self.matcher)
        hidden = [e.name for e in listing.entries if e.name.startswith(PRUNING_PREFIX)]
        if hidden and self._passes == 0 and not self.policy.dry_run:
            restore_interrupted(dir_fd, hidden)
            listing = scan_folder(dir_fd, self.matcher)
        checkpoints = listing.checkpoints
        verdicts = {
            entry.name: self.cache.check(dir_fd, entry.name, entry.stat) for entry in checkpoints
        }
        self.cache.forget_missing({stat_key(entry.stat) for entry in checkpoints})
        self._report_invalid(checkpoints, verdicts, started)
        if not checkpoints:
            self._warn_no_match(listing)
        arrivals = self._track_arrivals(checkpoints, verdicts)
        link_targets = self._remember_links(listing.link_targets, started)
        self._passes += 1

        plan = plan_retention(checkpoints, verdicts, link_targets, self.policy, arrivals)
        for decision in plan.kept:
            log.debug(
                "keep %r (step %s): %s", decision.entry.name, decision.entry.step, decision.reason
            )
        result = execute_plan(plan, dir_fd, self.policy.dry_run)
        self._report_outcome(plan, result)
        return PassSummary(
            checkpoints=len(checkpoints),
            kept=len(plan.kept),
            pruned=result.pruned,
            bytes_freed=result.bytes_freed,
            invalid=sum(1 for verdict in verdicts.values() if not verdict.valid),
            skipped=result.skipped,
            failed=result.failed,
            seconds=time.monotonic() - started,
            dry_run=self.policy.dry_run,
        )

    def _track_arrivals(self, checkpoints: list[Entry], verdicts) -> set[str]:
        """Return the newest valid arrival of each series since the first pass.

        An arrival is a valid checkpoint (by name and inode) that the previous pass did not see
        valid, so a file completes its arrival when it becomes valid. Ties within one pass go
        to the higher step.
        """
        # NOTE: arrivals live in memory only, so after a restart a rolled-back run's newest save
        # is ordered by step alone until its next save arrives.
        valid = {(e.name, e.stat.st_ino): e for e in checkpoints if verdicts[e.name].valid}
        highest: dict[str, int] = {}
        for entry in valid.values():
            highest[entry.series] = max(highest.get(entry.series, entry.step), entry.step)
        if self._passes > 0:
            newcomers: dict[str, Entry] = {}
            for key, entry in valid.items():
                best = newcomers.get(entry.series)
                if key not in self._valid_seen and (best is None or entry.step > best.step):
                    newcomers[entry.series] = entry
            for series, entry in newcomers.items():
                self._arrivals[series] = (self._passes, entry.step, entry.name)
                if entry.step < highest[series]:
                    log.warning(
                        "%r (step %d) arrived after step %d of its series %r: the run was "
                        "restarted or rolled back, so it is kept although higher steps exist",
                        entry.name,
                        entry.step,
                        highest[series],
                        series,
                    )
        self._valid_seen = set(valid)
        present = {entry.name for entry in valid.values()}
        self._arrivals = {s: a for s, a in self._arrivals.items() if a[2] in present}
        return {name for _, _, name in self._arrivals.values()}

    def _remember_links(self, current, now: float) -> dict[tuple[int, int], tuple[str, ...]]:
        """Return the link targets of this scan plus those seen within the last LINK_GRACE s."""
        for identity, names in current.items():
            self._links[identity] = (names, now)
        targets = {}
        for identity, (names, seen) in list(self._links.items()):
            if identity in current or now - seen < LINK_GRACE:
                targets[identity] = names
            else:
                del self._links[identity]
        return targets

    def _report_invalid(self, checkpoints: list[Entry], verdicts, now: float) -> None:
        """Log an invalid file once it has stayed unchanged for invalid_report_delay seconds.

        A file that is still being written changes between passes, so it is only logged at
        DEBUG and does not flood the log.
        """
        tracked = {}
        for entry in checkpoints:
            verdict = verdicts[entry.name]
            if verdict.valid:
                continue
            key = stat_key(entry.stat)
            previous = self._invalid_since.get(entry.name)
            since, reported = now, False
            if previous is not None and previous[0] == key:
                _, since, reported = previous
            if not reported and now - since >= self.invalid_report_delay:
                level = logging.INFO if self.invalid_report_delay == 0 else logging.WARNING
                log.log(level, "invalid, kept and not counted: %r (%s)", entry.name, verdict.reason)
                reported = True
            elif not reported:
                log.debug("not valid yet: %r (%s)", entry.name, verdict.reason)
            tracked[entry.name] = (key, since, reported)
        self._invalid_since = tracked

    def _warn_no_match(self, listing) -> None:
        # Hidden names (temp files of a save in progress, the lock file) are no sign of a wrong
        # pattern, so only visible names are shown.
        others = [e.name for e in listing.entries if e.kind is Kind.OTHER and e.name[:1] != "."]
        if not others or self._warned_no_match:
            return
        self._warned_no_match = True
        log.warning(
            "no checkpoint matches the pattern %r (a whole-name match with digits where its first "
            "'*' starts) among the %d other visible names in the folder, such as %s: check "
            "--pattern",
            self.policy.pattern,
            len(others),
            ", ".join(repr(name) for name in sorted(others)[:3]),
        )

    def _report_outcome(self, plan, result) -> None:
        """Report would-prune files and failed deletions, each once per version of the file."""
        reported = set()
        if self.policy.dry_run:
            for decision in plan.pruned:
                key = ("would prune", stat_key(decision.entry.stat))
                reported.add(key)
                if key not in self._reported:
                    self.report(f"would prune {describe_decision(decision)}")
        for decision, error in result.failures:
            key = ("failed", stat_key(decision.entry.stat))
            reported.add(key)
            level = logging.DEBUG if key in self._reported else logging.WARNING
            log.log(level, "failed to prune %r: %s; the pass goes on", decision.entry.name, error)
        self._reported = reported


def format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
