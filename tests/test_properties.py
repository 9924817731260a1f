"""Property tests: generated checkpoint folders, one real pass each, checked against the rules.

Each example is a folder drawn by helpers_folders.folder_specs: several series, valid and invalid
contents, decoy names, subfolders, links of every kind, milestones and two layouts (file times
and creation order). The expected deletions come from the spec alone.

Profiles: "dev" (default), "ci" (default when CI is set) and "thorough" (10,000 examples), chosen
with HYPOTHESIS_PROFILE=NAME. Example: HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import run_watcher
from helpers_corpus import ALL_KINDS, VALID_KINDS, corpus, rewrite_archive
from helpers_folders import (
    Built,
    FolderSpec,
    expected_pruned,
    folder_specs,
    is_milestone,
    link_protected,
    materialise,
    newest_valid,
    snapshot,
)
from hypothesis import HealthCheck, assume, event, given, settings

from watcher.config import Policy
from watcher.passes import Pruner, open_folder
from watcher.scan import LOCK_NAME
from watcher.validity import check_fd

settings.register_profile(
    "ci",
    parent=settings.get_profile("ci"),
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough",
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
PROFILE = settings.get_profile(PROFILE_NAME)
CLI_EXAMPLES = max(8, PROFILE.max_examples // 20)
"""The CLI property runs a real process per example, so it draws a twentieth as many."""

# tmpfs lists a folder in reverse creation order, so two creation orders give two listing
# orders there. Disk filesystems such as ext4 list in hash order, whatever the creation order.
TEMP_BASE = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@contextmanager
def temp_root():
    root = Path(tempfile.mkdtemp(prefix="ckpt-prop-", dir=TEMP_BASE))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def policy_for(spec: FolderSpec, folder: Path) -> Policy:
    return Policy(
        directory=folder,
        pattern=spec.pattern,
        keep_last=spec.keep_last,
        keep_every=spec.keep_every,
        milestones=spec.milestones,
    )


def run_pass(built: Built, spec: FolderSpec, pruner: Pruner | None = None):
    pruner = pruner or Pruner(policy_for(spec, built.folder))
    dir_fd = open_folder(built.folder)
    try:
        return pruner.run(dir_fd)
    finally:
        os.close(dir_fd)


def outside_state(built: Built) -> dict:
    return snapshot(built.root, skip=frozenset({"ckpt"}))


def names_in(folder: Path) -> set[str]:
    return set(os.listdir(folder))


def check_result(spec: FolderSpec, before: dict, after: dict, extra: set[str]) -> None:
    """Assert that exactly the expected names went and that every survivor is untouched."""
    expected_gone = expected_pruned(spec)
    top_before = {name for name in before if "/" not in name}
    top_after = {name for name in after if "/" not in name} - extra

    assert top_before - top_after == expected_gone, "deleted set differs from the rules"
    assert top_after <= top_before, "an entry appeared in the folder"
    for name, state in after.items():
        if name.split("/")[0] in extra:
            continue
        assert state == before[name], f"{name!r} changed"
    # The rules restated as the requirements a user relies on, so a failure names one of them.
    for ckpt in spec.checkpoints:
        if ckpt.content not in VALID_KINDS:
            assert ckpt.name in top_after, f"invalid file {ckpt.name!r} was deleted"
    assert newest_valid(spec) <= top_after, "a newest valid checkpoint of a series was deleted"
    deleted = top_before - top_after
    checkpoint_names = {c.name for c in spec.checkpoints}
    assert deleted <= checkpoint_names, f"non-checkpoints deleted: {deleted - checkpoint_names}"


def describe_example(spec: FolderSpec) -> None:
    """Label the example, so --hypothesis-show-statistics shows what the examples covered."""
    event(f"pattern {spec.pattern}")
    event(f"{len(spec.checkpoints) // 5 * 5}+ checkpoints")
    event(f"{len(expected_pruned(spec))} expected deletions")
    if link_protected(spec) & {c.name for c in spec.checkpoints}:
        event("a link protects a checkpoint")
    if any(is_milestone(spec, c.step) for c in spec.checkpoints):
        event("a milestone checkpoint")
    if len({c.series for c in spec.checkpoints}) > 1:
        event("several series")


@settings(PROFILE)
@given(spec=folder_specs())
def test_pass_follows_rules(spec: FolderSpec) -> None:
    describe_example(spec)
    with temp_root() as root_a, temp_root() as root_b:
        first = materialise(spec, root_a, spec.layouts[0])
        second = materialise(spec, root_b, spec.layouts[1])
        if os.listdir(first.folder) != os.listdir(second.folder):
            event("layouts listed in different orders")
        outside_before = outside_state(first)
        before = snapshot(first.folder)

        pruner = Pruner(policy_for(spec, first.folder))
        summary = run_pass(first, spec, pruner)

        check_result(spec, before, snapshot(first.folder), set())
        assert summary.pruned == len(expected_pruned(spec))
        assert summary.failed == 0
        assert summary.skipped == 0
        assert outside_state(first) == outside_before, "something outside the folder changed"

        settled = snapshot(first.folder)
        assert run_pass(first, spec, pruner).pruned == 0, "second pass pruned (same pruner)"
        assert run_pass(first, spec).pruned == 0, "second pass pruned (new pruner)"
        assert snapshot(first.folder) == settled

        # The other layout goes through the one-pass mode that --once uses.
        one_pass_pruner = Pruner(policy_for(spec, second.folder), single_pass=True)
        run_pass(second, spec, one_pass_pruner)
        assert names_in(second.folder) == names_in(first.folder), "result depends on the layout"
        with pytest.raises(RuntimeError, match="only one pass"):
            run_pass(second, spec, one_pass_pruner)


@settings(PROFILE)
@given(spec=folder_specs())
def test_invalid_files_change_nothing(spec: FolderSpec) -> None:
    """Removing every invalid checkpoint leaves the set of deleted valid checkpoints as it was."""
    assume(any(c.content not in VALID_KINDS for c in spec.checkpoints))
    clean = spec.without_invalid()
    with temp_root() as root_a, temp_root() as root_b:
        full = materialise(spec, root_a, spec.layouts[0])
        bare = materialise(clean, root_b, spec.layouts[0])
        full_before, bare_before = names_in(full.folder), names_in(bare.folder)

        run_pass(full, spec)
        run_pass(bare, clean)

        full_gone = full_before - names_in(full.folder)
        bare_gone = bare_before - names_in(bare.folder)
        assert full_gone == bare_gone


def cli_args(spec: FolderSpec, folder: Path) -> list[str]:
    args = [str(folder), "--once", "--pattern", spec.pattern, "--keep-last", str(spec.keep_last)]
    if spec.keep_every is not None:
        args += ["--keep-every", str(spec.keep_every)]
    if spec.milestones:
        args += ["--milestones", ",".join(str(step) for step in spec.milestones)]
    return args


@settings(PROFILE, max_examples=CLI_EXAMPLES)
@given(spec=folder_specs())
def test_cli_once_follows_rules(spec: FolderSpec) -> None:
    with temp_root() as root:
        built = materialise(spec, root, spec.layouts[0])
        outside_before = outside_state(built)
        before = snapshot(built.folder)

        result = run_watcher(*cli_args(spec, built.folder))

        assert result.returncode == 0, result.stderr
        check_result(spec, before, snapshot(built.folder), {LOCK_NAME})
        assert outside_state(built) == outside_before
        again = run_watcher(*cli_args(spec, built.folder))
        assert again.returncode == 0, again.stderr
        assert "pruned 0," in again.stderr


# ---------------------------------------------------------------------------
# Checks that the generated material is what the properties assume


def verdict_of(data: bytes):
    with tempfile.TemporaryFile() as file:
        file.write(data)
        file.flush()
        return check_fd(file.fileno())


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_corpus_verdict(kind: str) -> None:
    verdict = verdict_of(corpus()[kind])
    assert verdict.valid is (kind in VALID_KINDS), verdict.reason


def test_interrupted_archive_reason() -> None:
    verdict = verdict_of(corpus()["interrupted"])
    assert "named in data.pkl has no record" in verdict.reason


def test_archive_rewrite_keeps_validity() -> None:
    """The rewrite used to drop a record yields a valid file when it drops nothing."""
    verdict = verdict_of(rewrite_archive(corpus()["zip"]))
    assert verdict.valid, verdict.reason


@pytest.mark.skipif(TEMP_BASE is None, reason="no writable tmpfs at /dev/shm")
def test_creation_order_sets_listing_order() -> None:
    """On the temp filesystem used here, two creation orders give two listing orders."""
    with temp_root() as root:
        for name in ("c", "a", "d", "b"):
            (root / name).touch()
        assert os.listdir(root) == ["b", "d", "a", "c"]
