"""The retention decision as a table of folder histories, run as real passes over real files.

Each row builds a folder of real torch files (and damaged, foreign and linked names), runs one pass,
and compares what is deleted with the row's expectation. Invariants derived from the row's spec,
not from the implementation, are checked on every row, and so is independence from file times.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Samples, write_file

from watcher.config import build_policy
from watcher.passes import Pruner, open_folder
from watcher.scan import NameMatcher

RUN_A = "20251027_110846"
RUN_B = "20251028_090000"


def ck(step, run: str = RUN_A, seed: int = 42) -> str:
    return f"model_v2_step{step}_{run}_s{seed}.pt"


@dataclass
class Case:
    id: str
    files: dict[str, str]
    """Name to kind: valid, legacy, truncated, empty, foreign, text, dir, or link:TARGET."""
    pruned: set[str]
    options: dict = field(default_factory=dict)


def steps(kind: str, *numbers: int, **name_options) -> dict[str, str]:
    return {ck(number, **name_options): kind for number in numbers}


CASES = [
    Case(
        "newest two of one series",
        steps("valid", 100, 200, 300, 400, 500),
        {ck(100), ck(200), ck(300)},
    ),
    Case(
        "integer order beats string order",
        steps("valid", 8000, 9000, 10000, 900),
        {ck(900), ck(8000)},
    ),
    Case(
        "two seeds are two series",
        {**steps("valid", 1, 2, 3), **steps("valid", 1, 2, 3, seed=43)},
        {ck(1), ck(1, seed=43)},
    ),
    Case(
        "two runs are two series",
        {**steps("valid", 10, 20, 30), **steps("valid", 5, 15, 25, run=RUN_B)},
        {ck(10), ck(5, run=RUN_B)},
    ),
    Case(
        "truncated newest does not count",
        {**steps("valid", 100, 200, 300), ck(400): "truncated"},
        {ck(100)},
    ),
    Case(
        "empty newest does not count",
        {**steps("valid", 100, 200, 300), ck(400): "empty"},
        {ck(100)},
    ),
    Case(
        "foreign zip and text are invalid",
        {**steps("valid", 1, 2, 3), ck(4): "foreign", ck(5): "text"},
        {ck(1)},
    ),
    Case(
        "invalid old files are kept",
        {ck(1): "truncated", ck(2): "empty", **steps("valid", 3, 4, 5)},
        {ck(3)},
    ),
    Case("legacy format counts as valid", {**steps("legacy", 1, 2), **steps("valid", 3)}, {ck(1)}),
    Case(
        "names outside the pattern are untouched",
        {
            **steps("valid", 1, 2, 3),
            "model_v2_stepX_run.pt": "valid",
            "model_v2_step_latest.pt": "valid",
            f".{ck(9)}.tmp.1234": "valid",
            ck(8) + ".bak": "valid",
            "notes.txt": "text",
            "MODEL_V2_STEP7.pt": "valid",
        },
        {ck(1)},
    ),
    Case("folder with a checkpoint name", {**steps("valid", 1, 2, 3), ck(4): "dir"}, {ck(1)}),
    Case(
        "link target is kept",
        {**steps("valid", 1, 2, 3, 4), "best.pt": f"link:{ck(1)}"},
        {ck(2)},
    ),
    Case(
        "chain of links protects the end",
        {**steps("valid", 1, 2, 3, 4), "latest.pt": "link:best.pt", "best.pt": f"link:{ck(2)}"},
        {ck(1)},
    ),
    Case(
        "link with a checkpoint name is not a checkpoint",
        {**steps("valid", 1, 2, 3, 4), ck(99): f"link:{ck(1)}"},
        {ck(2)},
    ),
    Case(
        "dangling link protects nothing",
        {**steps("valid", 1, 2, 3), "best.pt": "link:gone.pt"},
        {ck(1)},
    ),
    Case(
        "link out of the folder is left alone",
        {**steps("valid", 1, 2, 3), "outside.pt": "link:../outside/" + ck(1)},
        {ck(1)},
    ),
    Case(
        "keep_every milestones take no place",
        steps("valid", 100, 200, 300, 400, 500, 600, 700),
        {ck(100), ck(300)},
        {"keep_every": 200},
    ),
    Case(
        "listed milestones are kept",
        steps("valid", 1, 2, 3, 4, 5, 6),
        {ck(2), ck(3), ck(4)},
        {"milestones": [1]},
    ),
    Case("keep_last 1", steps("valid", 1, 2, 3), {ck(1), ck(2)}, {"keep_last": 1}),
    Case("keep_last above count", steps("valid", 1, 2, 3), set(), {"keep_last": 5}),
    Case(
        "custom pattern",
        {
            "ckpt-1000.pt": "valid",
            "ckpt-2000.pt": "valid",
            "ckpt-500.pt": "valid",
            "ckpt-.pt": "valid",
        },
        {"ckpt-500.pt"},
        {"pattern": "ckpt-*.pt"},
    ),
    Case(
        "leading zeros and huge steps",
        {
            "ckpt-0009.pt": "valid",
            "ckpt-10.pt": "valid",
            "ckpt-99999999999999999999999.pt": "valid",
        },
        {"ckpt-0009.pt"},
        {"pattern": "ckpt-*.pt"},
    ),
    Case("all invalid deletes nothing", steps("truncated", 1, 2, 3, 4), set()),
    Case(
        "unicode, spaces and newlines",
        {
            "ckpt-1 é.pt": "valid",
            "ckpt-2 é.pt": "valid",
            "ckpt-3 é.pt": "valid",
            "ckpt-4\nx.pt": "valid",
        },
        {"ckpt-1 é.pt"},
        {"pattern": "ckpt-*.pt"},
    ),
    Case("dry run deletes nothing", steps("valid", 1, 2, 3, 4), {ck(1), ck(2)}, {"dry_run": True}),
]


def build_folder(root: Path, case: Case, samples: Samples, reverse_times: bool) -> Path:
    folder = root / "checkpoints"
    folder.mkdir(parents=True)
    (root / "outside").mkdir()
    write_file(root / "outside" / ck(1), samples.valid)
    contents = {
        "valid": samples.valid,
        "legacy": samples.legacy,
        "truncated": samples.truncated,
        "empty": b"",
        "foreign": samples.foreign_zip,
        "text": b"step 1 notes\n",
    }
    names = sorted(case.files)
    for index, name in enumerate(names):
        kind = case.files[name]
        # File times run against step order in one build and with it in the other.
        mtime = 1_700_000_000 + (len(names) - index if reverse_times else index) * 60
        if kind == "dir":
            (folder / name).mkdir()
        elif kind.startswith("link:"):
            os.symlink(kind[len("link:") :], folder / name)
        else:
            write_file(folder / name, contents[kind], mtime)
    return folder


def run_pass(folder: Path, options: dict):
    policy = build_policy({"directory": str(folder), **options})
    dir_fd = open_folder(folder)
    try:
        return policy, Pruner(policy).run(dir_fd)
    finally:
        os.close(dir_fd)


def snapshot(folder: Path) -> set[str]:
    return set(os.listdir(folder))


def link_targets(folder: Path) -> set[str]:
    """Resolve each link in the folder to the name it reaches inside the folder, if any."""
    targets = set()
    real = folder.resolve()
    for name in os.listdir(folder):
        path = folder / name
        if path.is_symlink() and path.exists() and path.resolve().parent == real:
            targets.add(path.resolve().name)
    return targets


def check_invariants(
    case: Case, policy, protected: set[str], before: set[str], after: set[str]
) -> None:
    """Check the rules that must hold for any policy, from the row's spec alone."""
    matcher = NameMatcher(policy.pattern)
    deleted = before - after
    for name in deleted:
        kind = case.files[name]
        assert kind in ("valid", "legacy"), f"deleted {name!r} of kind {kind}"
        assert name not in protected, f"deleted link target {name!r}"
        step, _ = matcher.match(name)
        assert not policy.is_milestone(step), f"deleted milestone {name!r}"
    series_steps: dict[str, list[tuple[int, str]]] = {}
    for name, kind in case.files.items():
        found = matcher.match(name)
        if found and kind in ("valid", "legacy") and not policy.is_milestone(found[0]):
            series_steps.setdefault(found[1], []).append((found[0], name))
    for series, entries in series_steps.items():
        newest = sorted(entries)[-policy.keep_last :]
        for _, name in newest:
            assert name in after, f"newest valid {name!r} of {series!r} is gone"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_retention_table(case: Case, samples: Samples, tmp_path: Path) -> None:
    results = []
    for reverse_times in (False, True):
        root = tmp_path / ("reversed" if reverse_times else "forward")
        folder = build_folder(root, case, samples, reverse_times)
        protected = link_targets(folder)
        before = snapshot(folder)
        policy, summary = run_pass(folder, case.options)
        after = snapshot(folder)

        assert before - after == (set() if policy.dry_run else case.pruned)
        assert summary.pruned == len(case.pruned)
        check_invariants(case, policy, protected, before, after)
        assert (root / "outside" / ck(1)).exists()

        _, second = run_pass(folder, case.options)
        assert second.pruned == (len(case.pruned) if policy.dry_run else 0)
        assert snapshot(folder) == after
        results.append(after)
    assert results[0] == results[1], "the result depends on file times"
