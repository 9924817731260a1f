"""Generated checkpoint folders: a spec, hypothesis strategies, a builder and the expected result.

The expected result is computed from the spec alone, from the retention rules stated in
watcher/policy.py, without calling the watcher's matcher, validity check or planner: the spec
records each checkpoint's step, series and content kind when it builds the name.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from helpers_corpus import ALL_KINDS, VALID_KINDS, corpus
from hypothesis import strategies as st

PATTERNS = ("model_v2_step*.pt", "ckpt-*.pt", "*.ckpt")

SERIES_KEYS = {
    "model_v2_step*.pt": ("20251027_110846_s42", "20251027_110846_s7", "run 2_s1", "rün_s3"),
    "ckpt-*.pt": ("", "-ema", "_b ü", "-\nnl"),
    "*.ckpt": ("", "-last", "_x", "_\udcff"),
}
"""Text after the step in each pattern's names; each value is one series. "\udcff" is how
Python spells the byte 0xff of a name that is not valid UTF-8."""

DECOYS = {
    "model_v2_step*.pt": (
        "model_v2_step_best.pt",
        "model_v2_stepX5.pt",
        "model_v2_step5_r_s1.pt.tmp",
        ".model_v2_step5_r_s1.pt.tmp",
        "model_v2_step5_r_s1.pth",
        "model_v2_step٣_r_s1.pt",
        "Model_v2_step5_r_s1.pt",
    ),
    "ckpt-*.pt": (
        "ckpt-latest.pt",
        "ckpt-.pt",
        "ckpt-5.pt.tmp",
        "xckpt-5.pt",
        "ckpt-5.ptx",
        "CKPT-5.pt",
        "ckpt-５.pt",
    ),
    "*.ckpt": ("latest.ckpt", ".ckpt", "5.ckpt.tmp", "x5.ckpt", "5.CKPT", "５.ckpt"),
}
"""Names that look like checkpoints of the pattern but are not: no ASCII digits where the
first `*` starts, or the whole name does not match."""

COMMON_DECOYS = ("notes.txt", "events.out.tfevents.1700000000", "README", "run log\n2.txt")

OUTSIDE_VICTIM = "victim.pt"
OUTSIDE_BACK_LINK = "back.lnk"
"""Link outside the folder that points back at an entry inside it."""


def checkpoint_name(pattern: str, step_text: str, series: str) -> str:
    """Build a checkpoint name of the pattern from the step digits and the series text."""
    if pattern == "model_v2_step*.pt":
        return f"model_v2_step{step_text}_{series}.pt"
    if pattern == "ckpt-*.pt":
        return f"ckpt-{step_text}{series}.pt"
    if pattern == "*.ckpt":
        return f"{step_text}{series}.ckpt"
    raise ValueError(f"no name builder for pattern {pattern!r}")


@dataclass(frozen=True)
class Checkpoint:
    name: str
    step: int
    series: str
    content: str


@dataclass(frozen=True)
class PlainFile:
    """A regular file whose name is not a checkpoint name of the policy's pattern."""

    name: str
    content: str


@dataclass(frozen=True)
class Subfolder:
    """A folder inside the checkpoint folder, holding a valid checkpoint when `with_file`."""

    name: str
    with_file: bool


@dataclass(frozen=True)
class Link:
    """A symlink inside the folder. `scope` is where the target is and how it is written.

    in: a name in the folder, written relative; abs: the same, written as an absolute path;
    out: a name in the outside folder, written as ../outside/NAME; missing: nothing there.
    """

    name: str
    scope: str
    target: str


@dataclass(frozen=True)
class FolderSpec:
    pattern: str
    keep_last: int
    keep_every: int | None
    milestones: tuple[int, ...]
    checkpoints: tuple[Checkpoint, ...]
    plain_files: tuple[PlainFile, ...]
    subfolders: tuple[Subfolder, ...]
    links: tuple[Link, ...]
    back_link_target: str | None
    """Entry in the folder that the outside link points to, or None for no such link."""
    layouts: tuple[Layout, ...] = field(default=())

    @property
    def names(self) -> list[str]:
        groups = (self.checkpoints, self.plain_files, self.subfolders, self.links)
        return [entry.name for group in groups for entry in group]

    def without_invalid(self) -> FolderSpec:
        """Return the same folder with every invalid checkpoint left out."""
        valid_checkpoints = tuple(c for c in self.checkpoints if c.content in VALID_KINDS)
        removed = {c.name for c in self.checkpoints} - {c.name for c in valid_checkpoints}
        back = None if self.back_link_target in removed else self.back_link_target
        links = tuple(
            link
            if link.target not in removed or link.scope not in ("in", "abs")
            else Link(link.name, "missing", "")
            for link in self.links
        )
        return FolderSpec(
            self.pattern,
            self.keep_last,
            self.keep_every,
            self.milestones,
            valid_checkpoints,
            self.plain_files,
            self.subfolders,
            links,
            back,
            self.layouts,
        )


@dataclass(frozen=True)
class Layout:
    """How one copy of a spec is laid down: a file time per entry and the creation order."""

    times: tuple[float, ...]
    order_seed: int


# ---------------------------------------------------------------------------
# Strategies

STEPS = st.one_of(st.integers(0, 40), st.integers(0, 10**25))
CONTENTS = st.sampled_from(ALL_KINDS + VALID_KINDS * 3)  # about 2 in 3 are valid
TIMES = st.floats(1_000_000_000, 2_000_000_000, allow_nan=False)


@st.composite
def _checkpoints(draw, pattern: str) -> list[Checkpoint]:
    series_keys = SERIES_KEYS[pattern]
    series_count = draw(st.integers(1, len(series_keys)))
    item = st.tuples(
        st.sampled_from(series_keys[:series_count]), STEPS, st.integers(0, 12), CONTENTS
    )
    found = []
    size = draw(st.integers(0, 16))
    for series, step, width, content in draw(st.lists(item, min_size=size, max_size=20)):
        name = checkpoint_name(pattern, str(step).zfill(width), series)
        found.append(Checkpoint(name, step, series, content))
    return found


@st.composite
def _links(draw, pattern: str, used_names: list[str]) -> list[Link]:
    candidates = ["latest.pt", "best", "link-a", "link-b", "link\nc"]
    # Links named like checkpoints of the pattern: a scan must never take them for checkpoints.
    for _ in range(2):
        step = draw(st.integers(0, 40))
        series = draw(st.sampled_from(SERIES_KEYS[pattern]))
        candidates.append(checkpoint_name(pattern, str(step), series))
    link_names = [
        name
        for name in draw(st.lists(st.sampled_from(candidates), max_size=5, unique=True))
        if name not in used_names
    ]
    in_folder = used_names + link_names
    outside = [OUTSIDE_VICTIM, OUTSIDE_BACK_LINK, "model.pt", "absent.pt"]
    links = []
    for name in link_names:
        scope = draw(st.sampled_from(("in", "in", "abs", "out", "missing")))
        if scope in ("in", "abs"):
            target = draw(st.sampled_from(in_folder))
        elif scope == "out":
            target = draw(st.sampled_from(outside))
        else:
            target = ""
        links.append(Link(name, scope, target))
    return links


@st.composite
def folder_specs(draw) -> FolderSpec:
    """Draw a folder: checkpoints of several series, decoys, subfolders, links, two layouts."""
    pattern = draw(st.sampled_from(PATTERNS))
    checkpoints = _unique(draw(_checkpoints(pattern)), set())
    used_names = {c.name for c in checkpoints}

    # At least two look-alikes of the pattern in every folder, so that every run of the
    # properties meets several of them, valid ones included.
    lookalikes = st.lists(st.sampled_from(DECOYS[pattern]), min_size=2, max_size=5, unique=True)
    others = st.lists(
        st.sampled_from(COMMON_DECOYS + _foreign_names(pattern)), max_size=4, unique=True
    )
    decoy_names = draw(lookalikes) + draw(others)
    plain = [PlainFile(name, draw(CONTENTS)) for name in decoy_names]
    plain = _unique(plain, used_names)
    used_names |= {p.name for p in plain}

    subfolder_items = st.tuples(STEPS, st.booleans())
    subfolders = [
        Subfolder(checkpoint_name(pattern, str(step), SERIES_KEYS[pattern][0]), with_file)
        for step, with_file in draw(st.lists(subfolder_items, max_size=2))
    ]
    subfolders = _unique(subfolders, used_names)
    used_names |= {s.name for s in subfolders}

    links = draw(_links(pattern, sorted(used_names)))
    names = sorted(used_names | {link.name for link in links})
    back = draw(st.none() | st.sampled_from(names)) if names else None

    steps = sorted({c.step for c in checkpoints})
    milestone_pool = st.sampled_from(steps) if steps else st.integers(0, 40)
    milestone_list = st.lists(milestone_pool | st.integers(0, 40), max_size=3)
    milestones = tuple(sorted(set(draw(milestone_list))))
    layout = st.builds(
        Layout,
        st.lists(TIMES, min_size=len(names), max_size=len(names)).map(tuple),
        st.integers(0, 2**32),
    )
    return FolderSpec(
        pattern=pattern,
        keep_last=draw(st.integers(1, 5)),
        keep_every=draw(st.sampled_from((None, None, None, 2, 3, 5, 10))),
        milestones=milestones,
        checkpoints=tuple(checkpoints),
        plain_files=tuple(plain),
        subfolders=tuple(subfolders),
        links=tuple(links),
        back_link_target=back,
        layouts=(draw(layout), draw(layout)),
    )


def _foreign_names(pattern: str) -> tuple[str, ...]:
    """Return checkpoint names of the other patterns, which this pattern must not match."""
    return tuple(
        checkpoint_name(other, "7", SERIES_KEYS[other][0]) for other in PATTERNS if other != pattern
    )


def _unique(entries: list, used_names: set[str]) -> list:
    seen = set(used_names)
    unique = []
    for entry in entries:
        if entry.name not in seen:
            seen.add(entry.name)
            unique.append(entry)
    return unique


# ---------------------------------------------------------------------------
# Building a folder


@dataclass(frozen=True)
class Built:
    root: Path
    folder: Path
    outside: Path


def materialise(spec: FolderSpec, root: Path, layout: Layout) -> Built:
    """Create the folder of `spec` under root/ckpt, plus root/outside and a sibling file.

    Entries are created in the layout's order (on tmpfs this is the reverse of listing order)
    and then given the layout's file times, links included.
    """
    data = corpus()
    folder, outside = root / "ckpt", root / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / OUTSIDE_VICTIM).write_bytes(data["zip"])
    (outside / "model.pt").write_bytes(data["legacy"])
    (root / checkpoint_name(spec.pattern, "1", SERIES_KEYS[spec.pattern][0])).write_bytes(
        data["zip"]
    )
    if spec.back_link_target is not None:
        os.symlink(f"../ckpt/{spec.back_link_target}", outside / OUTSIDE_BACK_LINK)

    creators = {}
    for entry in spec.checkpoints + spec.plain_files:
        creators[entry.name] = (_create_file, entry)
    for entry in spec.subfolders:
        creators[entry.name] = (_create_subfolder, entry)
    for entry in spec.links:
        creators[entry.name] = (_create_link, entry)
    names = spec.names
    order = list(names)
    random.Random(layout.order_seed).shuffle(order)
    for name in order:
        create, entry = creators[name]
        create(folder, entry)
    for name, when in zip(names, layout.times):
        os.utime(folder / name, (when, when), follow_symlinks=False)
    return Built(root, folder, outside)


def _create_file(folder: Path, entry: Checkpoint | PlainFile) -> None:
    (folder / entry.name).write_bytes(corpus()[entry.content])


def _create_subfolder(folder: Path, entry: Subfolder) -> None:
    (folder / entry.name).mkdir()
    if entry.with_file:
        (folder / entry.name / entry.name).write_bytes(corpus()["zip"])


def _create_link(folder: Path, entry: Link) -> None:
    if entry.scope == "in":
        target = entry.target
    elif entry.scope == "abs":
        target = str(folder / entry.target)
    elif entry.scope == "out":
        target = f"../outside/{entry.target}"
    else:
        target = "no-such-entry.pt"
    os.symlink(target, folder / entry.name)


# ---------------------------------------------------------------------------
# The expected result


def is_milestone(spec: FolderSpec, step: int) -> bool:
    if spec.keep_every is not None and step % spec.keep_every == 0:
        return True
    return step in spec.milestones


def link_protected(spec: FolderSpec) -> set[str]:
    """Return the regular files in the folder that some link in the folder resolves to.

    Links are followed through the spec, the way the kernel follows them: through other links,
    out of the folder and back in. A chain of more than 40 links or a loop resolves to nothing:
    Linux follows at most 40 links in one lookup (measured here with os.stat on a chain of 41).
    """
    links = {link.name: link for link in spec.links}
    files = {entry.name for entry in spec.checkpoints + spec.plain_files}
    protected = set()
    for start in links:
        place = ("in", start)
        for _ in range(41):
            where, name = place
            if where == "out":
                if name != OUTSIDE_BACK_LINK or spec.back_link_target is None:
                    break
                place = ("in", spec.back_link_target)
                continue
            if name in links:
                link = links[name]
                if link.scope == "missing":
                    break
                place = ("out" if link.scope == "out" else "in", link.target)
                continue
            if name in files:
                protected.add(name)
            break
    return protected


def expected_pruned(spec: FolderSpec) -> set[str]:
    """Return the names a correct pass deletes, from the retention rules alone.

    Rules: only checkpoints with valid content can go. Milestones are kept and take no place.
    Link targets are kept and do take a place. In each series the newest keep_last valid
    non-milestone checkpoints by (step, name) are kept.
    """
    protected = link_protected(spec)
    by_series = defaultdict(list)
    for ckpt in spec.checkpoints:
        if ckpt.content in VALID_KINDS and not is_milestone(spec, ckpt.step):
            by_series[ckpt.series].append(ckpt)
    pruned = set()
    for members in by_series.values():
        members.sort(key=lambda c: (c.step, c.name), reverse=True)
        pruned |= {c.name for c in members[spec.keep_last :] if c.name not in protected}
    return pruned


def newest_valid(spec: FolderSpec) -> set[str]:
    """Return, per series, the newest keep_last valid non-milestone checkpoints by step."""
    by_series = defaultdict(list)
    for ckpt in spec.checkpoints:
        if ckpt.content in VALID_KINDS and not is_milestone(spec, ckpt.step):
            by_series[ckpt.series].append(ckpt)
    newest = set()
    for members in by_series.values():
        members.sort(key=lambda c: (c.step, c.name), reverse=True)
        newest |= {c.name for c in members[: spec.keep_last]}
    return newest


# ---------------------------------------------------------------------------
# Snapshots


def entry_state(path: Path) -> tuple:
    """Return what identifies an entry's current state: type, inode, time and contents."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return ("link", info.st_ino, os.readlink(path))
    if stat.S_ISDIR(info.st_mode):
        return ("dir", info.st_ino)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ("file", info.st_ino, info.st_mtime_ns, info.st_size, digest)


def snapshot(top: Path, skip: frozenset[str] = frozenset()) -> dict[str, tuple]:
    """Return the state of every entry under top, recursively, keyed by relative path."""
    states = {}
    for current, dirs, files in os.walk(top):
        base = Path(current)
        for name in dirs + files:
            if base == top and name in skip:
                continue
            path = base / name
            states[str(path.relative_to(top))] = entry_state(path)
        if base == top:
            dirs[:] = [name for name in dirs if name not in skip]
    return states
