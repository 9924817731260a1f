"""One retention pass over a folder: scan, check validity, plan, prune, summarise."""

from __future__ import annotations

import dataclasses
import errno
import logging
import operator
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from watcher.config import Policy
from watcher.logs import FIELDS
from watcher.policy import plan_retention
from watcher.prune import (
    PRUNING_PREFIX,
    describe_decision,
    entry_fields,
    execute_plan,
    restore_interrupted,
)
from watcher.scan import LOCK_NAME, Entry, Kind, NameMatcher, lookup, resolve_links, scan_folder
from watcher.validity import ValidityCache, Verdict, stat_key
from watcher.validity.checks import check_unchanged

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
        if os.path.lexists(path):
            text = f"{str(path)!r} is not a folder: DIR must name the checkpoint folder"
        else:
            text = f"{str(path)!r} is not found because a part of its path is a file: check DIR"
        raise FolderError(errno.ENOTDIR, text) from None
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
    names: int | None = None
    """How many names a pass over changed names looked at; None for a pass over the folder."""
    process_errors: int = 0
    """Deleting processes that died or stopped before their share was done (see deleters)."""

    def describe(self) -> str:
        verb = "would prune" if self.dry_run else "pruned"
        freed = "would free" if self.dry_run else "freed"
        scope = ""
        if self.names is not None:
            scope = f" (over {self.names} changed name{'' if self.names == 1 else 's'})"
        text = (
            f"pass done in {self.seconds * 1000:.1f} ms{scope}: {self.checkpoints} checkpoints, "
            f"{self.kept} kept, {verb} {self.pruned}, {freed} {format_bytes(self.bytes_freed)}"
        )
        if self.invalid:
            text += f", {self.invalid} invalid kept"
        if self.skipped:
            text += f", {self.skipped} changed or gone since the scan"
        if self.failed:
            text += f", {self.failed} failed to delete"
        if self.process_errors:
            plural = "es" if self.process_errors > 1 else ""
            text += f", {self.process_errors} deleting process{plural} stopped early"
        return text


_CHECKED_BEFORE_DELETION = Verdict(True, "not checked yet: checked just before its deletion")

_STEP_ORDER = operator.attrgetter("step", "name")

LINK_GRACE = 60.0
"""Seconds a checkpoint stays protected after the last symlink to it disappears. Tools that refresh
`best.pt` by deleting and recreating it leave a moment with no link, and a pass that runs in that
moment must not prune the target."""


class Pruner:
    """Run retention passes for one policy, remembering what earlier passes saw.

    Between passes it keeps validity verdicts, recent symlink targets, and the newest arrival of
    each series. In the first pass nothing counts as an arrival, so a single pass (--once) follows
    the step order alone. `invalid_report_delay` is how long an invalid file must stay unchanged
    before it is reported as a warning; 0 reports it at once, as a one-shot run wants. `report`
    gets each would-prune line of a dry run as text; without it the lines are logged at INFO, with
    JSON fields. `processes` above 1 lets a full pass delete from that many forked processes; only
    a caller with no other thread running may ask for it. A Pruner made with `single_pass` runs
    one pass (--once) and skips keeping what later passes would need: the folder model, arrivals
    and cache upkeep took about 0.24 s of CPU on 100,000 files.

    run() lists the whole folder. run_changed() looks only at the names that events reported and
    plans only their series again, from the folder as the last pass left it; it falls back to run()
    when there is no such pass or a symlink is involved.
    """

    def __init__(
        self,
        policy: Policy,
        report: Callable[[str], None] | None = None,
        invalid_report_delay: float = 0.0,
        settle_seconds: float = 1.0,
        processes: int = 1,
        single_pass: bool = False,
        progress: Callable[[], None] | None = None,
    ) -> None:
        self.policy = policy
        self.progress = progress
        self.processes = processes
        self.single_pass = single_pass
        self.report = report
        self.matcher = NameMatcher(policy.pattern)
        self.cache = ValidityCache(settle_seconds=settle_seconds)
        self._settle_seconds = settle_seconds
        self.invalid_report_delay = invalid_report_delay
        self._passes = 0
        self._links: dict[tuple[int, int], tuple[tuple[str, ...], float]] = {}
        self._valid_seen: set[tuple[str, int]] = set()
        self._arrivals: dict[str, tuple[int, int, str]] = {}
        self._invalid_since: dict[str, tuple[tuple, float, bool]] = {}
        self._reported: set[tuple] = set()
        self._warned_no_match = False
        self._folder: _FolderModel | None = None

    @property
    def link_names(self) -> frozenset[str]:
        """Names of the symlinks seen by the last pass."""
        folder = self._folder
        return folder.link_names if folder is not None else frozenset()

    def set_settle_seconds(self, seconds: float) -> None:
        """Use a new settle time for cached verdicts (see ValidityCache), dropping the cache."""
        if seconds != self._settle_seconds:
            self.cache = ValidityCache(settle_seconds=seconds)
            self._settle_seconds = seconds

    def replace_policy(self, policy: Policy) -> None:
        """Apply a reloaded policy, keeping what earlier passes saw unless the pattern changed."""
        if policy.pattern != self.policy.pattern:
            self.matcher = NameMatcher(policy.pattern)
            self._valid_seen.clear()
            self._arrivals.clear()
            self._folder = None
        self.policy = policy

    def run(self, dir_fd: int) -> PassSummary:
        if self.single_pass and self._passes:
            raise RuntimeError("a Pruner made with single_pass runs only one pass")
        self._folder = None
        started = time.monotonic()
        listing = scan_folder(dir_fd, self.matcher, self.progress)
        hidden = [e.name for e in listing.entries if self._hidden_by_a_deletion(e)]
        if hidden and self._passes == 0 and not self.policy.dry_run:
            restore_interrupted(dir_fd, hidden, self.progress)
            listing = scan_folder(dir_fd, self.matcher, self.progress)
        checkpoints = listing.checkpoints
        link_targets = self._remember_links(listing.link_targets, started)
        if self._passes == 0:
            verdicts, deferred = self._first_verdicts(dir_fd, checkpoints, link_targets)
        else:
            verdicts = {}
            for entry in checkpoints:
                if self.progress is not None:
                    self.progress()
                verdicts[entry.name] = self.cache.check(dir_fd, entry.name, entry.stat)
            deferred = set()
        if not checkpoints:
            self._warn_no_match(listing)
        if self.single_pass:
            arrivals: set[str] = set()  # a first pass has none
            folder = None
        else:
            self.cache.forget_missing({stat_key(entry.stat) for entry in checkpoints})
            arrivals = self._track_arrivals(checkpoints, verdicts)
            links = frozenset(e.name for e in listing.entries if e.kind is Kind.LINK)
            folder = _FolderModel(checkpoints, verdicts, links)
        self._passes += 1
        plan = plan_retention(checkpoints, verdicts, link_targets, self.policy, arrivals)

        def confirm(decision) -> Verdict | None:
            """Check a deferred file just before its deletion; return the verdict to keep it."""
            entry = decision.entry
            if entry.name not in deferred:
                return None
            # Not through the cache: the file is deleted next, or kept with this verdict.
            return check_unchanged(dir_fd, entry.name, entry.stat)

        hidden_names = [e.name for e in listing.entries if e.name.startswith(PRUNING_PREFIX)]
        summary, kept_invalid = self._carry_out(
            plan,
            dir_fd,
            folder,
            len(checkpoints),
            started,
            partial=False,
            confirm=confirm,
            hidden_names=hidden_names,
        )
        for name, verdict in kept_invalid.items():
            verdicts[name] = verdict
            if folder is not None:
                folder.verdicts[name] = verdict
                self._valid_seen.discard((name, folder.entries[name].stat.st_ino))
        self._report_invalid(checkpoints, verdicts, started)
        self._folder = folder
        return dataclasses.replace(summary, invalid=len(self._invalid_since))

    def _hidden_by_a_deletion(self, entry: Entry) -> bool:
        """Return whether `entry` can be a checkpoint that an interrupted deletion left hidden.

        Only a regular file whose name without the prefix is a checkpoint name qualifies. Other
        names that happen to start with the prefix are not the watcher's and stay as they are.
        """
        if not entry.name.startswith(PRUNING_PREFIX) or entry.stat is None:
            return False
        name = entry.name[len(PRUNING_PREFIX) :]
        return stat.S_ISREG(entry.stat.st_mode) and self.matcher.match(name) is not None

    def _first_verdicts(
        self, dir_fd: int, checkpoints: list[Entry], link_targets
    ) -> tuple[dict[str, Verdict], set[str]]:
        """Check the files that decide what the plan keeps, and defer the others.

        In each series, from the highest step down, every file is checked until `keep_last`
        valid ones that are not milestones are found. Below those, milestones and link targets
        are checked too, since they stay. The rest would be pruned if valid: they get a
        provisional valid verdict and their real check runs just before their deletion, so that
        checking overlaps the deletions of a large first pass. No arrivals exist in a first
        pass, so nothing else depends on those verdicts.
        """
        series: dict[str, list[Entry]] = {}
        for entry in checkpoints:
            series.setdefault(entry.series, []).append(entry)
        verdicts: dict[str, Verdict] = {}
        deferred: set[str] = set()
        policy = self.policy
        for entries in series.values():
            entries.sort(key=_STEP_ORDER, reverse=True)
            newest = 0
            below = len(entries)
            for index, entry in enumerate(entries):
                if newest >= policy.keep_last:
                    below = index
                    break
                if self.progress is not None:
                    self.progress()
                verdict = self.cache.check(dir_fd, entry.name, entry.stat)
                verdicts[entry.name] = verdict
                if verdict.valid and not policy.is_milestone(entry.step):
                    newest += 1
            # Below the newest, one test per file: a large first pass has most of its files here.
            protected = [
                entry
                for entry in entries[below:]
                if policy.is_milestone(entry.step)
                or (link_targets and entry.identity in link_targets)
            ]
            for entry in protected:
                if self.progress is not None:
                    self.progress()
                verdicts[entry.name] = self.cache.check(dir_fd, entry.name, entry.stat)
            protected_names = {entry.name for entry in protected}
            later = [e.name for e in entries[below:] if e.name not in protected_names]
            verdicts.update(dict.fromkeys(later, _CHECKED_BEFORE_DELETION))
            deferred.update(later)
        return verdicts, deferred

    def run_changed(self, dir_fd: int, names: set[str]) -> PassSummary | None:
        """Bring the named files up to date and plan their series again.

        Return None when none of the names changed anything. A symlink among the names, or no
        earlier pass to start from, makes this a full pass.
        """
        folder, self._folder = self._folder, None
        if folder is None:
            return self.run(dir_fd)
        started = time.monotonic()
        changes = _Changes()
        try:
            for name in sorted(names):
                if not name.startswith(PRUNING_PREFIX) and name != LOCK_NAME:
                    self._look_up(dir_fd, folder, name, changes)
            if not changes.series:
                self._folder = folder
                return None
            self._refresh_newest(dir_fd, folder, changes)
        except _FullPassNeeded:
            return self.run(dir_fd)
        changed = [entry for entry in changes.entries if folder.entries.get(entry.name) is entry]

        names_changed = {entry.name for entry in changed}
        tracked = [
            folder.entries[name]
            for name in self._invalid_since
            if name in folder.entries and name not in names_changed
        ]
        self._report_invalid(changed + tracked, folder.verdicts, started)
        arrivals = self._note_arrivals(folder, changed, changes.removed)
        targets = resolve_links(dir_fd, sorted(folder.link_names)) if folder.link_names else {}
        link_targets = self._remember_links(targets, started)
        self._passes += 1
        entries = [entry for key in sorted(changes.series) for entry in folder.series_entries(key)]
        plan = plan_retention(entries, folder.verdicts, link_targets, self.policy, arrivals)
        summary, _ = self._carry_out(
            plan, dir_fd, folder, len(folder.entries), started, partial=True
        )
        self._folder = folder
        return dataclasses.replace(summary, names=len(names))

    def _look_up(self, dir_fd: int, folder: _FolderModel, name: str, changes: _Changes) -> None:
        """Look `name` up again and bring the folder model up to date with it.

        Raise _FullPassNeeded when the name is, or was, a symlink.
        """
        changes.looked_up.add(name)
        entry = lookup(dir_fd, name, self.matcher)
        if name in folder.link_names or (entry is not None and entry.kind is Kind.LINK):
            raise _FullPassNeeded
        if entry is not None and entry.kind is not Kind.CHECKPOINT:
            entry = None
        old = folder.entries.get(name)
        verdict = None if entry is None else self.cache.check(dir_fd, name, entry.stat)
        if (
            old is not None
            and entry is not None
            and stat_key(old.stat) == stat_key(entry.stat)
            and verdict == folder.verdicts[name]
        ):
            return
        if old is not None:
            folder.remove(old)
            changes.removed.add((old.name, old.stat.st_ino))
            changes.series.add(old.series)
        if entry is not None:
            folder.add(entry, verdict)
            changes.entries.append(entry)
            changes.series.add(entry.series)

    def _refresh_newest(self, dir_fd: int, folder: _FolderModel, changes: _Changes) -> None:
        """Look again at the files that count among the newest of each series to be planned.

        The inotify observer reports a file rewritten in place only when its writer closes it,
        so a file the model counts among the newest valid ones may be half rewritten by now.
        From the highest step down to the keep_last-th valid file that is not a milestone, each
        file not looked up in this pass yet is looked up again.
        """
        for key in sorted(changes.series):
            entries = sorted(
                folder.series_entries(key), key=lambda e: (e.step, e.name), reverse=True
            )
            counted = 0
            for old in entries:
                if counted >= self.policy.keep_last:
                    break
                if old.name not in changes.looked_up:
                    self._look_up(dir_fd, folder, old.name, changes)
                current = folder.entries.get(old.name)
                if (
                    current is not None
                    and folder.verdicts[current.name].valid
                    and not self.policy.is_milestone(current.step)
                ):
                    counted += 1

    def _carry_out(
        self,
        plan,
        dir_fd: int,
        folder: _FolderModel | None,
        total: int,
        started: float,
        partial: bool,
        confirm: Callable | None = None,
        hidden_names: list[str] | None = None,
    ) -> tuple[PassSummary, dict[str, Verdict]]:
        """Log the plan, delete what it prunes, update the folder model and summarise.

        `total` is the number of checkpoints before the deletions. `folder` is None in a single
        pass, which keeps no model. `hidden_names` are as in execute_plan. Also return the files
        that `confirm` kept as invalid, with their verdicts.
        """
        for decision in plan.kept:
            log.debug(
                "keep %r (step %s): %s", decision.entry.name, decision.entry.step, decision.reason
            )
        # Only a full pass may fork: a pass over names runs in the daemon, beside its threads.
        processes = 1 if partial else self.processes
        result = execute_plan(
            plan, dir_fd, self.policy.dry_run, confirm, processes, hidden_names, self.progress
        )
        for name in result.gone if folder is not None else ():
            entry = folder.entries.get(name)
            if entry is not None:
                folder.remove(entry)
                # The inode may be reused by a later file of the same name.
                self._valid_seen.discard((name, entry.stat.st_ino))
        self._report_outcome(plan, result, partial)
        summary = PassSummary(
            checkpoints=total,
            kept=total - len(plan.pruned) + len(result.kept_invalid),
            pruned=result.pruned,
            bytes_freed=result.bytes_freed,
            invalid=len(self._invalid_since),
            skipped=result.skipped,
            failed=len(result.failures),
            process_errors=len(result.errors),
            seconds=time.monotonic() - started,
            dry_run=self.policy.dry_run,
        )
        return summary, result.kept_invalid

    def _note_arrivals(
        self, folder: _FolderModel, changed: list[Entry], removed: set[tuple[str, int]]
    ) -> set[str]:
        """Record the newest valid newcomer of each series among `changed`, as run() does.

        `removed` contains the (name, inode) keys of the entries that `changed` replaced or that
        went away. What the previous pass saw valid is updated only after the comparison.
        """
        newcomers: dict[str, Entry] = {}
        valid_now = set()
        for entry in changed:
            key = (entry.name, entry.stat.st_ino)
            if not folder.verdicts[entry.name].valid:
                continue
            valid_now.add(key)
            if key in self._valid_seen:
                continue
            best = newcomers.get(entry.series)
            if best is None or entry.step > best.step:
                newcomers[entry.series] = entry
        for series, entry in newcomers.items():
            self._arrivals[series] = (self._passes, entry.step, entry.name)
            highest = max(
                e.step for e in folder.series_entries(series) if folder.verdicts[e.name].valid
            )
            if entry.step < highest:
                _warn_rollback(entry, highest)
        # In place, so the cost follows the change and not the size of the folder.
        self._valid_seen -= removed
        self._valid_seen |= valid_now
        self._arrivals = {
            series: arrival
            for series, arrival in self._arrivals.items()
            if arrival[2] in folder.entries and folder.verdicts[arrival[2]].valid
        }
        return {name for _, _, name in self._arrivals.values()}

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
                    _warn_rollback(entry, highest[series])
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
        DEBUG and does not flood the log. `checkpoints` must hold every invalid file still
        tracked, so that the ones not listed are dropped.
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
                log.log(
                    level,
                    "invalid, kept and not counted: %r (%s)",
                    entry.name,
                    verdict.reason,
                    extra={FIELDS: entry_fields("invalid", entry, verdict.reason)},
                )
                reported = True
            elif not reported:
                log.debug("not valid yet: %r (%s)", entry.name, verdict.reason)
            tracked[entry.name] = (key, since, reported)
        self._invalid_since = tracked

    def _report_would_prune(self, decision) -> None:
        text = f"would prune {describe_decision(decision)}"
        if self.report is not None:
            self.report(text)
        else:
            fields = entry_fields("would_prune", decision.entry, decision.reason)
            log.info("%s", text, extra={FIELDS: fields})

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

    def _report_outcome(self, plan, result, partial: bool) -> None:
        """Report would-prune files and failed deletions, each once per version of the file.

        A partial plan covers some series only, so what was reported for the others is kept.
        """
        reported = set(self._reported) if partial else set()
        if self.policy.dry_run:
            kept = result.kept_invalid
            for decision in plan.pruned:
                if decision.entry.name in kept:
                    continue
                key = ("would prune", stat_key(decision.entry.stat))
                reported.add(key)
                if key not in self._reported:
                    self._report_would_prune(decision)
        for index, error in result.failures:
            decision = plan.pruned[index]
            key = ("failed", stat_key(decision.entry.stat))
            reported.add(key)
            level = logging.DEBUG if key in self._reported else logging.WARNING
            log.log(
                level,
                "failed to prune %r: %s; the pass goes on",
                decision.entry.name,
                error,
                extra={FIELDS: entry_fields("prune_failed", decision.entry, error)},
            )
        self._reported = reported


def _warn_rollback(entry: Entry, highest: int) -> None:
    log.warning(
        "%r (step %d) arrived after step %d of its series %r: the run was "
        "restarted or rolled back, so it is kept although higher steps exist",
        entry.name,
        entry.step,
        highest,
        entry.series,
    )


class _FullPassNeeded(Exception):
    """A pass over names met a symlink, which changes what is protected: list the folder."""


@dataclass
class _Changes:
    """Changes that a pass over names found in the folder model."""

    entries: list[Entry] = field(default_factory=list)
    """Entries taken in, new or replacing an older version of their name."""
    removed: set[tuple[str, int]] = field(default_factory=set)
    """(name, inode) keys of the entries replaced or gone."""
    series: set[str] = field(default_factory=set)
    """Series of all of those, which the pass plans again."""
    looked_up: set[str] = field(default_factory=set)
    """Names looked up in this pass."""


class _FolderModel:
    """The checkpoints of the folder as the last pass left them, indexed by name and series."""

    def __init__(self, checkpoints: list[Entry], verdicts: dict, link_names: frozenset[str]):
        self.entries: dict[str, Entry] = {}
        self.verdicts: dict[str, Verdict] = {}
        self.link_names = link_names
        self._series: dict[str, dict[str, Entry]] = {}
        for entry in checkpoints:
            self.add(entry, verdicts[entry.name])

    def add(self, entry: Entry, verdict: Verdict) -> None:
        self.entries[entry.name] = entry
        self.verdicts[entry.name] = verdict
        self._series.setdefault(entry.series, {})[entry.name] = entry

    def remove(self, entry: Entry) -> None:
        del self.entries[entry.name]
        del self.verdicts[entry.name]
        members = self._series[entry.series]
        del members[entry.name]
        if not members:
            del self._series[entry.series]

    def series_entries(self, series: str) -> list[Entry]:
        return list(self._series.get(series, {}).values())


def format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
