"""Command line of the trainer: `ckpt-train` and `python -m trainer`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import warnings
from collections.abc import Sequence

from trainer.config import (
    FIELDS,
    FLOAT,
    INT,
    OPTIONAL_FLOAT,
    ConfigError,
    build_config,
    load_yaml,
)
from trainer.stop import StopRequest

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT

_DESCRIPTION = """\
Train a small byte-level transformer language model and save checkpoints to
LOG_DIR/checkpoints/model_v2_step{step}_{run}_s{seed}.pt, where run is the local
start time as YYYYmmdd_HHMMSS. Without --data, it trains on the source files of
the Python standard library.

Options override the values of --config FILE, a YAML mapping whose keys are the
option names with underscores (for example save_every_steps: 50). Every option
with dashes also accepts underscores (--save_every_steps). Relative paths, in
options and in the file, are relative to the current folder."""

_EPILOG = f"""\
resume:
  --resume continues from the checkpoint with the highest step in
  LOG_DIR/checkpoints that loads, whatever run wrote it, keeping its run name and
  seed; a checkpoint that fails to load is skipped with a warning. With an
  explicit seed, only checkpoints of that seed count. Model and optimizer
  settings come from the checkpoint. --steps is the total step count and
  defaults to the checkpoint's. With nothing to resume from, a new run starts
  with a warning.

signals:
  SIGTERM and SIGINT finish the current step, save a checkpoint, wait until it
  is on disk and stop. Saves are atomic: a temp file is written, fsynced and
  renamed, so a checkpoint name never contains a partial file. The fsync and the
  rename run in the background while training goes on. The trainer never
  deletes checkpoints.

exit status:
  {EXIT_OK}    reached --steps, or stopped by SIGTERM after saving a checkpoint
  {EXIT_FAILED}    a checkpoint could not be written (disk full, file size limit,
       permission denied; earlier checkpoints are kept), or the loss diverged
  {EXIT_USAGE}    invalid option, config file, --data file or --resume request
  {EXIT_INTERRUPTED}  stopped by SIGINT (Ctrl-C) after saving a checkpoint"""

_ARGUMENT_TYPES = {INT: int, FLOAT: float, OPTIONAL_FLOAT: float}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt-train",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", default=None, help="YAML file of config values")
    parser.add_argument(
        "--resume",
        action="store_true",
        default=False,
        help="continue from the newest loadable checkpoint in LOG_DIR/checkpoints",
    )
    for name, config_field in FIELDS.items():
        _add_field_option(parser, name, config_field)
    return parser


def _add_field_option(
    parser: argparse.ArgumentParser, name: str, config_field: dataclasses.Field
) -> None:
    flags = [f"--{name.replace('_', '-')}"]
    if "_" in name:
        flags.append(f"--{name}")
    metadata = config_field.metadata
    default = config_field.default
    help_text = metadata["help"] if default is None else f"{metadata['help']} (default: {default})"
    parser.add_argument(
        *flags,
        dest=name,
        type=_ARGUMENT_TYPES.get(metadata["kind"], str),
        metavar=metadata["metavar"],
        help=help_text,
    )


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trainer with `argv` (default: sys.argv[1:]) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse exits 0 after --help and 2 after printing a usage error.
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_USAGE
    _configure_logging()
    stop = StopRequest()
    previous_handlers = stop.install()
    try:
        return _run(args, stop)
    finally:
        StopRequest.restore(previous_handlers)


def _run(args: argparse.Namespace, stop: StopRequest) -> int:
    option_values = {key: value for key, value in vars(args).items() if key in FIELDS}
    try:
        file_values = load_yaml(args.config) if args.config is not None else {}
        config, explicit = build_config(file_values, f"config file {args.config}", option_values)
    except ConfigError as error:
        logger.error("%s", error)
        return EXIT_USAGE

    # torch warns at import when numpy is missing, and the trainer does not use numpy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    from trainer.checkpoint import CheckpointSaveError
    from trainer.data import DataError
    from trainer.loop import TrainingError, start_run, train

    try:
        run = start_run(config, explicit, resume=args.resume)
        train(run, stop)
    except (ConfigError, DataError) as error:
        logger.error("%s", error)
        return EXIT_USAGE
    except CheckpointSaveError as error:
        logger.error(
            "%s. No partial file was left, and earlier checkpoints are kept. Free disk space, "
            "raise the file size limit or fix the folder's permissions, then rerun with --resume",
            error,
        )
        return EXIT_FAILED
    except TrainingError as error:
        logger.error("%s", error)
        return EXIT_FAILED
    if stop.signum == signal.SIGINT:
        return EXIT_INTERRUPTED
    return EXIT_OK
