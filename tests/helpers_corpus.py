"""Real file contents for the property, hostile and concurrency tests, made once per session.

Every valid kind comes from `torch.save`. Every invalid kind is derived from those bytes or is a
plain foreign file, so the watcher's verdict can be predicted from the kind alone.
"""

from __future__ import annotations

import functools
import io
import pickle
import types
import zipfile

VALID_KINDS = ("zip", "zip_large", "legacy")
"""Contents that are complete torch checkpoints."""

INVALID_KINDS = (
    "truncated",
    "truncated_legacy",
    "empty",
    "interrupted",
    "foreign_zip",
    "text",
)
"""Contents that are not complete torch checkpoints and must never be deleted."""

ALL_KINDS = VALID_KINDS + INVALID_KINDS


def _torch_bytes(state_size: int, **options) -> bytes:
    import torch

    state = {
        "weight": torch.arange(state_size, dtype=torch.float32),
        "bias": torch.zeros(3, dtype=torch.float64),
        "step": state_size,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer, **options)
    return buffer.getvalue()


def rewrite_archive(data: bytes, drop_suffix: str | None = None) -> bytes:
    """Copy a torch zip archive record by record with zipfile, leaving out one record.

    zipfile writes zip64 end records only for large archives, while torch always writes them.
    Lowering zipfile's entry-count limit for the copy makes it write them too, so the copy
    differs from a torch archive only in the record left out (and in record alignment).
    """
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    saved_limit = zipfile.ZIP_FILECOUNT_LIMIT
    zipfile.ZIP_FILECOUNT_LIMIT = 0
    try:
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
            for info in source.infolist():
                if drop_suffix is not None and info.filename.endswith(drop_suffix):
                    continue
                target.writestr(info.filename, source.read(info.filename))
    finally:
        zipfile.ZIP_FILECOUNT_LIMIT = saved_limit
    return out.getvalue()


def _foreign_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    return out.getvalue()


@functools.cache
def corpus() -> dict[str, bytes]:
    """Return the bytes of each content kind, keyed by the names in ALL_KINDS."""
    valid = _torch_bytes(16)
    legacy = _torch_bytes(16, _use_new_zipfile_serialization=False)
    return {
        "zip": valid,
        "zip_large": _torch_bytes(4096),
        "legacy": legacy,
        "truncated": valid[: len(valid) // 2],
        "truncated_legacy": legacy[:-10],
        "empty": b"",
        # A finalised archive without the second storage's record: what an interrupted
        # torch.save leaves behind.
        "interrupted": rewrite_archive(valid, drop_suffix="/data/1"),
        "foreign_zip": _foreign_zip(),
        "text": b"step: 100\nloss: 0.25\n",
    }


@functools.cache
def slow_checkpoint() -> bytes:
    """Return a valid checkpoint whose data.pkl contains a list of a million integers.

    The watcher unpickles data.pkl with a pure-Python unpickler, so checking this file took
    0.31 s on the 2-core test machine: long enough for a test to act while a pass is busy.
    """
    import torch

    state = {"weight": torch.ones(4), "history": list(range(1_000_000))}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def crafted_pickle_module(payload: bytes) -> types.ModuleType:
    """Return a pickle module for torch.save that writes `payload` as data.pkl.

    The real object is still pickled, into a scratch buffer, so torch registers and
    writes its storages as usual.
    """

    class Pickler(pickle.Pickler):
        def __init__(self, file, protocol=None) -> None:
            super().__init__(io.BytesIO(), protocol)
            self._target = file

        def dump(self, obj) -> None:
            super().dump(obj)
            self._target.write(payload)

    module = types.ModuleType("crafted_pickle")
    module.Pickler = Pickler
    module.Unpickler = pickle.Unpickler
    return module
