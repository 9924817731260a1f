"""The retention policy: one frozen, checked object built from a YAML file and the command line."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from watcher.scan import first_star_in_class

DEFAULT_PATTERN = "model_v2_step*.pt"
DEFAULT_KEEP_LAST = 2
DEFAULT_RESCAN_INTERVAL = 300.0


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key, the value and the fix."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Policy:
    """Retention policy for one checkpoint folder."""

    directory: Path
    """Folder whose checkpoints are pruned. Only files directly inside it are considered."""
    pattern: str = DEFAULT_PATTERN
    """Glob that a whole file name must match; the step is the digits where the first `*` starts."""
    keep_last: int = DEFAULT_KEEP_LAST
    """Number of newest valid checkpoints kept in each series, milestones not counted."""
    keep_every: int | None = None
    """Steps divisible by this are milestones and are always kept."""
    milestones: tuple[int, ...] = ()
    """Steps that are always kept."""
    dry_run: bool = False
    """Report what would be pruned and delete nothing."""
    polling: bool | None = None
    """Observer choice for the daemon: True polls, False uses inotify, None decides from the mount."""
    rescan_interval: float = DEFAULT_RESCAN_INTERVAL
    """Seconds between full rescans in the daemon, which catch events that were missed."""
    config_file: Path | None = field(default=None, compare=False)
    """YAML file the policy was read from, so the daemon can reload it."""

    def is_milestone(self, step: int) -> bool:
        if self.keep_every is not None and step % self.keep_every == 0:
            return True
        return step in self.milestones

    def describe(self) -> str:
        """Return the policy as one sentence for the start-up log, after "policy: "."""
        plural = "" if self.keep_last == 1 else "s"
        parts = [f"keep the newest {self.keep_last} valid checkpoint{plural} of each series"]
        if self.keep_every is not None:
            parts.append(f"every step divisible by {self.keep_every}")
        if self.milestones:
            parts.append("steps " + ", ".join(str(step) for step in sorted(self.milestones)))
        sentence = f"in {self.directory}, files matching {self.pattern!r}: " + ", and ".join(parts)
        sentence += "; keep every checkpoint a symlink points to; never delete invalid files"
        if self.dry_run:
            sentence += " (dry run: nothing is deleted)"
        return sentence + "."


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Policy) if f.name != "config_file")


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping of field names to raw values.

    Raises ConfigError for a missing or unreadable file, invalid YAML (with the line), a document
    that is not a mapping, or an unknown key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found: check the --config path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {error}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML{where}: {problem}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must be a mapping of keys to values, "
            f"not a {type(data).__name__}; valid keys: {', '.join(FIELD_NAMES)}"
        )
    for key in data:
        if key not in FIELD_NAMES:
            raise ConfigError(
                f"unknown key {key!r} in config file {str(path)!r}; "
                f"valid keys: {', '.join(FIELD_NAMES)}"
            )
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects a key given twice, which PyYAML would silently merge."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is not a plain name", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def build_policy(values: dict[str, Any], config_file: Path | None = None) -> Policy:
    """Check raw values (from YAML and the command line merged) and return the Policy."""
    if values.get("directory") is None:
        raise ConfigError(
            "missing checkpoint folder: give DIR on the command line or 'directory' in the config"
        )
    defaults = {
        "pattern": DEFAULT_PATTERN,
        "keep_last": DEFAULT_KEEP_LAST,
        "keep_every": None,
        "milestones": None,
        "dry_run": False,
        "polling": None,
        "rescan_interval": DEFAULT_RESCAN_INTERVAL,
    }
    return Policy(**check_values({**defaults, **values}), config_file=config_file)


def check_values(values: dict[str, Any]) -> dict[str, Any]:
    """Check each of the given raw values, keyed by field name, and return them converted.

    Raise ConfigError on the first invalid value. A config file's values are checked this way
    on their own too, so that an invalid one is rejected even where the command line sets it.
    """
    checks = {
        "directory": _check_directory,
        "pattern": check_pattern,
        "keep_last": lambda value: _check_int("keep_last", value, 1),
        "keep_every": lambda value: _check_optional_int("keep_every", value, 1),
        "milestones": _check_milestones,
        "dry_run": lambda value: _check_bool("dry_run", value),
        "polling": lambda value: _check_optional_bool("polling", value),
        "rescan_interval": _check_interval,
    }
    return {key: checks[key](value) for key, value in values.items()}


def check_pattern(pattern: Any) -> str:
    """Return the pattern when it is a usable file-name glob; raise ConfigError otherwise."""
    if not isinstance(pattern, str):
        raise ConfigError(
            f"pattern must be a string such as {DEFAULT_PATTERN!r}, not {pattern!r}", "pattern"
        )
    if "*" not in pattern:
        raise ConfigError(
            f"pattern {pattern!r} has no '*': put '*' where the step number starts, "
            f"as in {DEFAULT_PATTERN!r}",
            "pattern",
        )
    if "/" in pattern or os.sep in pattern or "\0" in pattern:
        raise ConfigError(
            f"pattern {pattern!r} contains a path separator: it must match file names "
            "directly inside the folder, so give the folder as DIR",
            "pattern",
        )
    if first_star_in_class(pattern):
        raise ConfigError(
            f"pattern {pattern!r} has its first '*' inside [...]: the first '*' must stand where "
            "the step number starts",
            "pattern",
        )
    if ".." in pattern:
        raise ConfigError(f"pattern {pattern!r} contains '..': remove it", "pattern")
    return pattern


def _check_directory(value: Any) -> Path:
    if not isinstance(value, (str, Path)) or not str(value) or "\0" in str(value):
        raise ConfigError(f"directory must be a non-empty path string, not {value!r}", "directory")
    # Absolute now, so that the daemon keeps watching the same folder if its working directory
    # is deleted later.
    return Path(os.path.abspath(os.path.expanduser(value)))


def _check_int(key: str, value: Any, minimum: int) -> int:
    # bool is a subclass of int, so `keep_last: true` would pass a plain isinstance check.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be a whole number >= {minimum}, not {value!r}", key)
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, not {value}", key)
    return value


def _check_optional_int(key: str, value: Any, minimum: int) -> int | None:
    return None if value is None else _check_int(key, value, minimum)


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {value!r}", key)
    return value


def _check_optional_bool(key: str, value: Any) -> bool | None:
    return None if value is None else _check_bool(key, value)


def _check_milestones(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(
            f"milestones must be a list of steps such as [1000, 5000], not {value!r}", "milestones"
        )
    for step in value:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(
                f"milestones must list whole steps >= 0, and {step!r} is not one", "milestones"
            )
    return tuple(sorted(set(value)))


def _check_interval(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"rescan_interval must be a number of seconds, not {value!r}", "rescan_interval"
        )
    if not math.isfinite(value) or value < 1:
        raise ConfigError(
            f"rescan_interval must be a finite number of seconds >= 1, not {value}",
            "rescan_interval",
        )
    return float(value)
