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
import operator
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from watcher.config import Policy
from watcher.scan import Entry
from watcher.validity import Verdict

_STEP_ORDER = operator.attrgetter("step", "name")


class Action(enum.Enum):
    KEEP = "keep"
    PRUNE = "prune"


class Decision(NamedTuple):
    """The action for one checkpoint and its reason; a named tuple, as a plan makes one per file."""

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
    arrivals = set(arrivals)
    for series in sorted(by_series):
        entries = sorted(by_series[series], key=_STEP_ORDER)
        decisions.extend(_plan_series(entries, verdicts, link_targets, policy, arrivals))
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

    # The tests of policy.is_milestone and _is_valid, inline: this loop runs once per file.
    keep_every = policy.keep_every
    milestones = frozenset(policy.milestones)
    decisions = []
    for entry in entries:
        name = entry.name
        verdict = verdicts.get(name)
        if verdict is None or not verdict.valid:
            detail = verdict.reason if verdict is not None else "not checked"
            reason = f"invalid ({detail}): invalid files are never deleted"
        elif link_targets and entry.identity in link_targets:
            links = ", ".join(repr(link) for link in link_targets[entry.identity])
            reason = f"target of symlink {links}"
        elif keep_every is not None and entry.step % keep_every == 0:
            reason = f"milestone (step divisible by {keep_every})"
        elif entry.step in milestones:
            reason = "milestone (listed in milestones)"
        elif name in newest_names:
            reason = f"among the newest {valid_checkpoints(policy.keep_last)} of its series"
        elif name in arrivals:
            reason = (
                "the checkpoint of its series written most recently, although higher steps exist"
            )
        else:
            decisions.append(Decision(entry, Action.PRUNE, prune_reason))
            continue
        decisions.append(Decision(entry, Action.KEEP, reason))
    return decisions


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
        verdict = verdicts.get(entry.name)
        if verdict is None or not verdict.valid:
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
