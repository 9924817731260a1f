"""List a checkpoint folder once and classify each name, without reading file contents."""

from __future__ import annotations

import enum
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

LOCK_NAME = ".ckpt-watcher.lock"
"""Lock file kept in the watched folder. It has no digits, so no pattern can make it a checkpoint."""


class Kind(enum.Enum):
    CHECKPOINT = "checkpoint"
    LINK = "link"
    OTHER = "other"


class Entry(NamedTuple):
    """One name directly inside the folder, as seen by a single scan.

    A named tuple rather than a dataclass: a scan makes one per name, up to 100,000 of them and
    more, and a tuple takes half the time to build.
    """

    name: str
    kind: Kind
    step: int | None = None
    series: str | None = None
    stat: os.stat_result | None = None
    """The entry's own lstat result; None for other names."""

    @property
    def identity(self) -> tuple[int, int]:
        return (self.stat.st_dev, self.stat.st_ino)


@dataclass(frozen=True)
class Listing:
    entries: tuple[Entry, ...]
    link_targets: dict[tuple[int, int], tuple[str, ...]]
    """Identity (device, inode) of each file that a symlink in the folder resolves to, with the
    names of the links, so that a checkpoint reached through any chain of links is kept."""

    @property
    def checkpoints(self) -> list[Entry]:
        return [entry for entry in self.entries if entry.kind is Kind.CHECKPOINT]


class NameMatcher:
    """Match whole file names against a glob and read the step and series out of a match.

    The step is the run of digits at the start of the text that the first `*` matches; the series
    is the name with those digits removed. `*` and `?` match any character, as in fnmatch.
    """

    def __init__(self, pattern: str) -> None:
        head, tail = pattern.split("*", 1)
        self.pattern = pattern
        # Each part of the head matches one character, so the text of the first `*` starts at the
        # same place in every match. Its leading digits are therefore the digits group: as many
        # as the longest match of the `*` allows, and at least one.
        self._regex = re.compile(_translate(head) + "([0-9]+).*" + _translate(tail), re.DOTALL)

    def match(self, name: str) -> tuple[int, str] | None:
        """Return (step, series) for a checkpoint name, or None."""
        found = self._regex.fullmatch(name)
        if found is None:
            return None
        start, end = found.span(1)
        return int(found[1]), name[:start] + name[end:]


def scan_folder(
    dir_fd: int, matcher: NameMatcher, progress: Callable[[], None] | None = None
) -> Listing:
    """List the folder open at dir_fd once and classify every name in it.

    `progress`, when given, is called once per name, so that a long scan can show it is alive.
    """
    entries: list[Entry] = []
    link_names: list[str] = []
    with os.scandir(dir_fd) as listing:
        for item in listing:
            if progress is not None:
                progress()
            name = item.name
            try:
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed between listing and stat
            except PermissionError as error:
                raise _lookup_error(name, error) from None
            entry = classify(name, info, matcher)
            entries.append(entry)
            if entry.kind is Kind.LINK:
                link_names.append(name)
    return Listing(tuple(entries), resolve_links(dir_fd, link_names))


def lookup(dir_fd: int, name: str, matcher: NameMatcher) -> Entry | None:
    """Classify one name of the folder open at dir_fd; None if the name does not exist."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except PermissionError as error:
        raise _lookup_error(name, error) from None
    return classify(name, info, matcher)


def classify(name: str, info: os.stat_result, matcher: NameMatcher) -> Entry:
    """Classify a name from its own lstat result."""
    mode = info.st_mode
    if S_ISLNK(mode):
        return Entry(name, LINK, None, None, info)
    found = matcher.match(name) if S_ISREG(mode) and name != LOCK_NAME else None
    if found is None:
        return Entry(name, OTHER, None, None, info)
    return Entry(name, CHECKPOINT, found[0], found[1], info)


# Module-level names for classify(), which runs once per name in the folder.
S_ISLNK = stat.S_ISLNK
S_ISREG = stat.S_ISREG
LINK, OTHER, CHECKPOINT = Kind.LINK, Kind.OTHER, Kind.CHECKPOINT


def _lookup_error(name: str, error: PermissionError) -> PermissionError:
    return PermissionError(
        error.errno,
        f"cannot look up {name!r}: {error.strerror}; the watcher needs read and "
        "execute (search) permission on the folder",
    )


def resolve_links(dir_fd: int, link_names: list[str]) -> dict[tuple[int, int], tuple[str, ...]]:
    """Return the identity of the file each link resolves to, with the names of its links."""
    targets: dict[tuple[int, int], tuple[str, ...]] = {}
    for name in link_names:
        try:
            info = os.stat(name, dir_fd=dir_fd)  # follows the whole chain of links
        except OSError:
            continue  # dangling or looping link: protects nothing
        key = (info.st_dev, info.st_ino)
        targets[key] = targets.get(key, ()) + (name,)
    return targets


def _translate(glob: str) -> str:
    """Translate a glob fragment into a regular expression, as fnmatch would."""
    parts: list[str] = []
    index = 0
    while index < len(glob):
        char = glob[index]
        index += 1
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        elif char == "[":
            end = _bracket_end(glob, index)
            if end < 0:
                parts.append(re.escape(char))
                continue
            body = glob[index:end].replace("\\", "\\\\")
            # Set operations (&&, ~~, ||) and a leading `[` would mean more to re than to a glob.
            body = re.sub(r"([&~|])", r"\\\1", body)
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith(("^", "[")):
                body = "\\" + body
            parts.append(f"[{body}]")
            index = end + 1
        else:
            parts.append(re.escape(char))
    return "".join(parts)


def first_star_in_class(pattern: str) -> bool:
    """Return whether the first `*` of a glob is inside a [...] class, as in `a[*]b`."""
    index = 0
    while index < len(pattern):
        char = pattern[index]
        index += 1
        if char == "*":
            return False
        if char == "[":
            end = _bracket_end(pattern, index)
            if end >= 0:
                if "*" in pattern[index:end]:
                    return True
                index = end + 1
    return False


def _bracket_end(glob: str, start: int) -> int:
    """Return the index of the `]` closing a class that opened before start, or -1."""
    index = start
    if index < len(glob) and glob[index] == "!":
        index += 1
    if index < len(glob) and glob[index] == "]":
        index += 1
    return glob.find("]", index)
