"""The retention decision: checkpoints in, a keep or prune decision with a reason for each out.

This module touches no files. Its rules, applied to each series on its own:

- Order is the integer step, never the file time or the string order of names.
- The newest `keep_last` valid checkpoints are kept. Milestones never use up one of those places.
- Every milestone is kept, and so is every checkpoint that a symlink in the folder resolves to.
- The caller may name checkpoints that just arrived (the daemon names the newest arrival of each
  series), which are kept too, so a restarted or rolled-back run that reuses a series never has
  the checkpoint it just wrote pruned because of stale higher steps.
- An invalid file (empty, truncated, still being written, not a torch file) is always kept and
  never counts, so it can neither push out a valid checkpoint nor be deleted while it is written.
- Every other checkpoint is pruned.
"""

from __future__ import annotations

import enum
import functools
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from watcher.config import Policy
from watcher.scan import Entry
from watcher.validity import Verdict


class Action(enum.Enum):
    KEEP = "keep"
    PRUNE = "prune"


@dataclass(frozen=True)
class Decision:
    entry: Entry
    action: Action
    reason: str


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]

    # Cached, because a pass reads each list several times and a plan can hold 100,000 decisions.
    @functools.cached_property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.action is Action.KEEP]

    @functools.cached_property
    def pruned(self) -> list[Decision]:
        return [d for d in self.decisions if d.action is Action.PRUNE]


class UnsafePlanError(RuntimeError):
    """A plan would delete the newest valid checkpoint of a series; nothing is deleted."""


def plan_retention(
    checkpoints: Iterable[Entry],
    verdicts: Mapping[str, Verdict],
    link_targets: Mapping[tuple[int, int], tuple[str, ...]],
    policy: Policy,
    arrivals: Collection[str] = (),
) -> Plan:
    """Decide, for every checkpoint, whether it is kept or pruned, and why.

    `verdicts` maps each checkpoint name to its validity; a missing name counts as invalid.
    `arrivals` names checkpoints that are kept because they were just written.
    The result is sorted by series, then step, then name, so it never depends on listing order.
    """
    by_series: dict[str, list[Entry]] = defaultdict(list)
    for entry in checkpoints:
        by_series[entry.series].append(entry)

    decisions: list[Decision] = []
    for series in sorted(by_series):
        entries = sorted(by_series[series], key=lambda e: (e.step, e.name))
        decisions.extend(_plan_series(entries, verdicts, link_targets, policy, set(arrivals)))
    _check_newest_kept(decisions, verdicts)
    return Plan(tuple(decisions))


def _plan_series(
    entries: list[Entry],
    verdicts: Mapping[str, Verdict],
    link_targets: Mapping[tuple[int, int], tuple[str, ...]],
    policy: Policy,
    arrivals: set[str],
) -> list[Decision]:
    newest: list[Entry] = []
    for entry in reversed(entries):
        if len(newest) == policy.keep_last:
            break
        if _is_valid(entry, verdicts) and not policy.is_milestone(entry.step):
            newest.append(entry)
    newest_names = {entry.name for entry in newest}
    prune_reason = f"older than the newest {valid_checkpoints(policy.keep_last)} of its series"
    if newest:
        prune_reason += f" (the oldest of those is step {newest[-1].step})"

    decisions = []
    for entry in entries:
        reason = _reason_to_keep(entry, verdicts, link_targets, policy, newest_names, arrivals)
        if reason is not None:
            decisions.append(Decision(entry, Action.KEEP, reason))
        else:
            decisions.append(Decision(entry, Action.PRUNE, prune_reason))
    return decisions


def _reason_to_keep(
    entry: Entry,
    verdicts: Mapping[str, Verdict],
    link_targets: Mapping[tuple[int, int], tuple[str, ...]],
    policy: Policy,
    newest_names: set[str],
    arrivals: set[str],
) -> str | None:
    if not _is_valid(entry, verdicts):
        verdict = verdicts.get(entry.name)
        detail = verdict.reason if verdict is not None else "not checked"
        return f"invalid ({detail}): invalid files are never deleted"
    if entry.identity in link_targets:
        links = ", ".join(repr(name) for name in link_targets[entry.identity])
        return f"target of symlink {links}"
    if policy.keep_every is not None and entry.step % policy.keep_every == 0:
        return f"milestone (step divisible by {policy.keep_every})"
    if entry.step in policy.milestones:
        return "milestone (listed in milestones)"
    if entry.name in newest_names:
        return f"among the newest {valid_checkpoints(policy.keep_last)} of its series"
    if entry.name in arrivals:
        return "the checkpoint of its series written most recently, although higher steps exist"
    return None


def valid_checkpoints(count: int) -> str:
    """Return '1 valid checkpoint' or 'N valid checkpoints'."""
    return f"{count} valid checkpoint" if count == 1 else f"{count} valid checkpoints"


def _is_valid(entry: Entry, verdicts: Mapping[str, Verdict]) -> bool:
    verdict = verdicts.get(entry.name)
    return verdict is not None and verdict.valid


def _check_newest_kept(decisions: list[Decision], verdicts: Mapping[str, Verdict]) -> None:
    """Raise UnsafePlanError if any series would lose its newest valid checkpoint."""
    newest: dict[str, Decision] = {}
    for decision in decisions:
        entry = decision.entry
        if not _is_valid(entry, verdicts):
            continue
        best = newest.get(entry.series)
        if best is None or (entry.step, entry.name) > (best.entry.step, best.entry.name):
            newest[entry.series] = decision
    for series, decision in newest.items():
        if decision.action is not Action.KEEP:
            raise UnsafePlanError(
                f"the plan would prune {decision.entry.name!r}, the newest valid checkpoint of "
                f"series {series!r}; nothing was deleted"
            )
