"""Training configuration: a frozen dataclass checked on creation, loaded from YAML and options.

This module does not import torch, so that `--help` and configuration errors stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Value kinds of the config fields. Each kind has one parser on the command line and one
# type check in `TrainConfig.__post_init__`.
INT = "int"
FLOAT = "float"
OPTIONAL_FLOAT = "optional float"
STR = "str"
OPTIONAL_STR = "optional str"


class ConfigError(ValueError):
    """An invalid configuration value. The message names the key and the fix."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key


def _option(
    default: Any,
    kind: str,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    fixed_on_resume: bool = False,
    metavar: str | None = None,
) -> Any:
    """Declare a config field with its help text, value kind and allowed range.

    `fixed_on_resume` marks the fields that shape the trained model or its training trajectory.
    A resumed run takes them from the checkpoint.
    """
    metadata = {
        "kind": kind,
        "help": help,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "fixed_on_resume": fixed_on_resume,
        "metavar": metavar,
    }
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run. Creating an instance validates every field.

    The defaults train a byte-level transformer of about 470,000 parameters on the source
    files of the Python standard library.
    """

    steps: int = _option(
        1000,
        INT,
        "total number of optimizer steps, including steps done before --resume",
        minimum=1,
        metavar="N",
    )
    save_every_steps: int = _option(
        100,
        INT,
        "save a checkpoint every N steps (and always after the last step)",
        minimum=1,
        metavar="N",
    )
    save_every_seconds: float | None = _option(
        None,
        OPTIONAL_FLOAT,
        "also save when this many seconds have passed since the last save",
        minimum=0.0,
        exclusive_minimum=True,
        metavar="SECONDS",
    )
    log_dir: str = _option(
        "runs", STR, "run folder; checkpoints go to LOG_DIR/checkpoints", metavar="DIR"
    )
    seed: int = _option(
        0,
        INT,
        "seed of model initialization, dropout and batch sampling",
        minimum=0,
        maximum=2**63 - 1,
        fixed_on_resume=True,
        metavar="S",
    )
    data: str | None = _option(
        None,
        OPTIONAL_STR,
        "text file to train on (default: source files of the Python standard library)",
        fixed_on_resume=True,
        metavar="FILE",
    )
    max_corpus_bytes: int = _option(
        2_000_000,
        INT,
        "bytes of training text to read at most",
        minimum=1,
        fixed_on_resume=True,
        metavar="BYTES",
    )
    batch_size: int = _option(
        16, INT, "sequences per batch", minimum=1, fixed_on_resume=True, metavar="N"
    )
    seq_len: int = _option(
        64, INT, "bytes per training sequence", minimum=1, fixed_on_resume=True, metavar="N"
    )
    d_model: int = _option(
        128, INT, "width of the transformer", minimum=1, fixed_on_resume=True, metavar="N"
    )
    n_layers: int = _option(
        2, INT, "number of transformer blocks", minimum=1, fixed_on_resume=True, metavar="N"
    )
    n_heads: int = _option(
        4,
        INT,
        "attention heads per block; must divide d_model",
        minimum=1,
        fixed_on_resume=True,
        metavar="N",
    )
    dropout: float = _option(
        0.0,
        FLOAT,
        "dropout probability",
        minimum=0.0,
        maximum=0.99,
        fixed_on_resume=True,
        metavar="P",
    )
    lr: float = _option(
        3e-3,
        FLOAT,
        "peak learning rate of AdamW",
        minimum=0.0,
        exclusive_minimum=True,
        fixed_on_resume=True,
        metavar="LR",
    )
    warmup_steps: int = _option(
        20,
        INT,
        "steps of linear learning-rate warmup",
        minimum=0,
        fixed_on_resume=True,
        metavar="N",
    )
    weight_decay: float = _option(
        0.01, FLOAT, "AdamW weight decay", minimum=0.0, fixed_on_resume=True, metavar="W"
    )
    grad_clip: float = _option(
        1.0,
        FLOAT,
        "maximum gradient norm",
        minimum=0.0,
        exclusive_minimum=True,
        fixed_on_resume=True,
        metavar="NORM",
    )
    threads: int = _option(1, INT, "torch CPU threads", minimum=1, metavar="N")
    log_every: int = _option(10, INT, "log the loss every N steps", minimum=1, metavar="N")

    def __post_init__(self) -> None:
        for config_field in dataclasses.fields(self):
            value = _check_value(config_field, getattr(self, config_field.name))
            object.__setattr__(self, config_field.name, value)
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                "n_heads",
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                "choose n_heads so that d_model / n_heads is a whole number",
            )

    def to_dict(self) -> dict[str, str | int | float | None]:
        """Return the fields as plain values, as stored in checkpoints."""
        return dataclasses.asdict(self)


FIELDS = {config_field.name: config_field for config_field in dataclasses.fields(TrainConfig)}
FIXED_ON_RESUME = frozenset(
    name for name, config_field in FIELDS.items() if config_field.metadata["fixed_on_resume"]
)


def _check_value(config_field: dataclasses.Field, value: Any) -> Any:
    """Check one field's type and range and return the value, with ints widened to float."""
    kind = config_field.metadata["kind"]
    name = config_field.name
    if value is None and kind in (OPTIONAL_FLOAT, OPTIONAL_STR):
        return None
    if kind == INT:
        value = _check_int(name, value)
    elif kind in (FLOAT, OPTIONAL_FLOAT):
        value = _check_float(name, value)
    else:
        _check_str(name, value)
        return value
    _check_range(config_field, value)
    return value


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _check_int(name: str, value: Any) -> int:
    # bool is a subclass of int, but `steps: true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            name, f"{name} must be an integer, got {_describe(value)}; write a whole number"
        )
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, str):
        raise ConfigError(
            name,
            f"{name} must be a number, got {_describe(value)}; write it without quotes, and "
            "with a dot in the mantissa in YAML (3.0e-3, not 3e-3, which YAML reads as text)",
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            name, f"{name} must be a number, got {_describe(value)}; write a number such as 0.5"
        )
    if not math.isfinite(value):
        raise ConfigError(
            name, f"{name} must be a finite number, got {value!r}; write a finite value"
        )
    return float(value)


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(
            name, f"{name} must be a non-empty string, got {_describe(value)}; write a path"
        )


def _check_range(config_field: dataclasses.Field, value: float) -> None:
    metadata = config_field.metadata
    minimum = metadata["minimum"]
    maximum = metadata["maximum"]
    if minimum is not None and metadata["exclusive_minimum"] and value <= minimum:
        _raise_out_of_range(config_field, value, f"greater than {minimum}", "higher")
    if minimum is not None and not metadata["exclusive_minimum"] and value < minimum:
        _raise_out_of_range(config_field, value, f"at least {minimum}", "higher")
    if maximum is not None and value > maximum:
        _raise_out_of_range(config_field, value, f"at most {maximum}", "lower")


def _raise_out_of_range(
    config_field: dataclasses.Field, value: float, bound: str, direction: str
) -> None:
    name = config_field.name
    fix = f"set {name} {direction}"
    if config_field.metadata["kind"] in (OPTIONAL_FLOAT, OPTIONAL_STR):
        fix += " or leave it unset"
    raise ConfigError(name, f"{name} must be {bound}, got {value!r}; {fix}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file and return its mapping. Raise ConfigError if it is not one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            None, f"cannot read config file {path}: {error}; check the --config path"
        ) from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(None, f"config file {path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(
            None,
            f"config file {path} must contain a mapping of config keys to values, got "
            f"{type(values).__name__}; write lines such as 'steps: 100'",
        )
    for key in values:
        if not isinstance(key, str):
            raise ConfigError(
                None, f"config file {path}: key {key!r} is not a string; use a config key name"
            )
    return values


def check_keys(values: Mapping[str, Any], source: str) -> None:
    """Raise ConfigError naming the first key that is not a config field."""
    for key in values:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                key,
                f"{source}: unknown key '{key}'; {hint}valid keys are: {', '.join(FIELDS)}",
            )


def build_config(
    file_values: Mapping[str, Any], file_label: str, option_values: Mapping[str, Any]
) -> tuple[TrainConfig, frozenset[str]]:
    """Merge defaults, config-file values and command-line values, in rising precedence.

    Return the config and the set of keys set explicitly by the file or the command line.
    The `data` path is made absolute so that a resumed run finds it from any folder.
    """
    check_keys(file_values, file_label)
    check_keys(option_values, "command line")
    # File values are checked even where an option overrides them, so a bad file always fails.
    for key, value in file_values.items():
        try:
            _check_value(FIELDS[key], value)
        except ConfigError as error:
            raise ConfigError(key, f"invalid value in {file_label}: {error}") from None
    values = {**file_values, **option_values}
    try:
        config = TrainConfig(**values)
    except ConfigError as error:
        source = _source_of(error.key, file_values, file_label, option_values)
        raise ConfigError(error.key, f"{source}: {error}") from None
    if config.data is not None:
        config = dataclasses.replace(config, data=str(Path(config.data).resolve()))
    return config, frozenset(values)


def _source_of(
    key: str | None,
    file_values: Mapping[str, Any],
    file_label: str,
    option_values: Mapping[str, Any],
) -> str:
    if key in option_values:
        return f"invalid option --{key.replace('_', '-')}"
    if key in file_values:
        return f"invalid value in {file_label}"
    return "invalid configuration"
