"""Check that the property tests can fail: run them against deliberately broken retention rules.

Each mutant wraps a function that watcher/passes.py calls (plan_retention or scan_folder) so
that one rule is broken (further arguments pass through unchanged), runs the property tests of test_properties.py, and reports whether
they caught it. Every mutant must be caught. Run from the repository root:

    .venv/bin/python tests/helpers_mutants.py

The properties run with the "ci" profile's examples (derandomized, so the result repeats) but
without shrinking, which would take minutes per mutant, and without an example database, so
no failing example of a mutant is replayed by later pytest runs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import stat
import sys
import time
from pathlib import Path

os.environ["HYPOTHESIS_PROFILE"] = "ci"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_properties
from helpers_folders import folder_specs
from hypothesis import Phase, given, settings

import watcher.passes
from watcher.scan import Entry, Kind, Listing
from watcher.validity import Verdict

ORIGINAL_PLAN = watcher.passes.plan_retention
ORIGINAL_SCAN = watcher.passes.scan_folder


def _ranked(entries, key) -> list[Entry]:
    """Return the entries with each step replaced by its rank under key."""
    ordered = sorted(entries, key=key)
    return [entry._replace(step=rank) for rank, entry in enumerate(ordered)]


def links_ignored(checkpoints, verdicts, link_targets, policy, *rest):
    return ORIGINAL_PLAN(checkpoints, verdicts, {}, policy, *rest)


def invalid_counted(checkpoints, verdicts, link_targets, policy, *rest):
    all_valid = {name: Verdict(True, "mutant") for name in verdicts}
    return ORIGINAL_PLAN(checkpoints, all_valid, link_targets, policy, *rest)


def keep_one_fewer(checkpoints, verdicts, link_targets, policy, *rest):
    fewer = dataclasses.replace(policy, keep_last=max(1, policy.keep_last - 1))
    return ORIGINAL_PLAN(checkpoints, verdicts, link_targets, fewer, *rest)


def milestones_ignored(checkpoints, verdicts, link_targets, policy, *rest):
    plain = dataclasses.replace(policy, keep_every=None, milestones=())
    return ORIGINAL_PLAN(checkpoints, verdicts, link_targets, plain, *rest)


def name_order(checkpoints, verdicts, link_targets, policy, *rest):
    ranked = _ranked(checkpoints, key=lambda entry: entry.name)
    return ORIGINAL_PLAN(ranked, verdicts, link_targets, policy, *rest)


def time_order(checkpoints, verdicts, link_targets, policy, *rest):
    ranked = _ranked(checkpoints, key=lambda entry: (entry.stat.st_mtime_ns, entry.name))
    return ORIGINAL_PLAN(ranked, verdicts, link_targets, policy, *rest)


def series_merged(checkpoints, verdicts, link_targets, policy, *rest):
    merged = [entry._replace(series="") for entry in checkpoints]
    return ORIGINAL_PLAN(merged, verdicts, link_targets, policy, *rest)


def digits_not_required(dir_fd, matcher):
    """A scan that takes every regular file whose whole name matches the glob for a checkpoint,
    as one step of one series when no digits stand where the first `*` starts. The step is a
    prime, so keep_every never makes it a milestone."""
    listing = ORIGINAL_SCAN(dir_fd, matcher)
    entries = []
    for entry in listing.entries:
        regular = entry.stat is not None and stat.S_ISREG(entry.stat.st_mode)
        if (
            entry.kind is Kind.OTHER
            and regular
            and fnmatch.fnmatchcase(entry.name, matcher.pattern)
        ):
            entry = Entry(entry.name, Kind.CHECKPOINT, 999_999_937, "glob only", entry.stat)
        entries.append(entry)
    return Listing(tuple(entries), listing.link_targets)


PLAN_MUTANTS = (
    links_ignored,
    invalid_counted,
    keep_one_fewer,
    milestones_ignored,
    name_order,
    time_order,
    series_merged,
)
SCAN_MUTANTS = (digits_not_required,)


def _without_shrinking(prop):
    quick = settings(
        test_properties.PROFILE,
        phases=(Phase.generate,),
        database=None,
        report_multiple_bugs=False,
    )
    runner = quick(given(spec=folder_specs())(prop.hypothesis.inner_test))
    runner.__name__ = prop.__name__
    return runner


PROPERTIES = tuple(
    _without_shrinking(prop)
    for prop in (
        test_properties.test_pass_follows_rules,
        test_properties.test_invalid_files_change_nothing,
    )
)


def run_properties() -> list[str]:
    """Run each property test once; return 'caught' or 'missed' for each."""
    outcomes = []
    for prop in PROPERTIES:
        try:
            prop()
        except Exception:  # noqa: BLE001 - any failure, of any type, means the mutant was caught
            outcomes.append("caught")
        else:
            outcomes.append("missed")
    return outcomes


def main() -> int:
    # The watcher warns about folders without checkpoints, which generated folders often are.
    logging.basicConfig(level=logging.ERROR)
    missed = 0
    mutants = [("plan_retention", m) for m in PLAN_MUTANTS]
    mutants += [("scan_folder", m) for m in SCAN_MUTANTS]
    for attribute, mutant in mutants:
        original = getattr(watcher.passes, attribute)
        setattr(watcher.passes, attribute, mutant)
        started = time.monotonic()
        try:
            outcomes = run_properties()
        finally:
            setattr(watcher.passes, attribute, original)
        seconds = time.monotonic() - started
        names = ", ".join(f"{p.__name__}: {o}" for p, o in zip(PROPERTIES, outcomes))
        print(f"{mutant.__name__:20} {names} ({seconds:.1f} s)", flush=True)
        missed += "caught" not in outcomes
    print(f"{len(mutants) - missed} of {len(mutants)} mutants caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
