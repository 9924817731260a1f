"""Tests for what makes watcher.validity cheap: read windows, the data.pkl fast path and the
shared stand-in classes. Each saving must leave every verdict and reason unchanged."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import threading
import warnings
import zipfile
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from helpers_corpus import crafted_pickle_module

from watcher.validity import _fast_unpickle, _unpickle, check_file
from watcher.validity._common import TAIL_WINDOW_BYTES, Invalid
from watcher.validity.checks import open_and_check

# ---------------------------------------------------------------------------
# Helpers


def _save(path: Path, obj: object, **kwargs) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        name = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
        return archive.read(name)


def _state_dict_with_optimizer() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}


# Objects whose data.pkl covers every opcode the fast path runs: scalars of each kind, big
# ints, lists, tuples, dicts, sets, bytes, a whole nn.Module and shared storages.
SHAPES = {
    "tensor": lambda: torch.randn(5, 6),
    "optimizer": _state_dict_with_optimizer,
    "scalars": lambda: {
        "values": (1, -5, 300, 70000, 2**40, 2**70, 2.5, None, True, False, "text", b"raw"),
        "list": [torch.ones(2), [1, 2], []],
        "set": {1, 2},
    },
    "module": lambda: torch.nn.Linear(2, 3),
    "shared_storage": lambda: {"base": torch.arange(12.0), "view": torch.arange(12.0)[2:5]},
}


def _globals_pickle(names: list[tuple[str, str]]) -> bytes:
    """Return a protocol 2 pickle of a tuple of the globals `names`."""
    parts = [b"\x80\x02("]
    for module, name in names:
        parts.append(b"c" + module.encode() + b"\n" + name.encode() + b"\n")
    parts.append(b"t.")
    return b"".join(parts)


def _save_globals(path: Path, names: list[tuple[str, str]]) -> Path:
    module = crafted_pickle_module(_globals_pickle(names))
    return _save(path, torch.zeros(2), pickle_module=module)


class _ReferenceUnpickler(_unpickle._RestrictedUnpickler):
    """The restricted unpickler with the standard library's own load loop and FRAME handler."""

    dispatch: ClassVar[dict] = dict(_unpickle._RestrictedUnpickler.dispatch)
    dispatch[pickle.FRAME[0]] = pickle._Unpickler.dispatch[pickle.FRAME[0]]
    load = pickle._Unpickler.load


_ADDRESS = re.compile(r"0x[0-9a-f]+")


def _reference_outcome(data: bytes) -> tuple:
    storages: dict = {}
    try:
        _ReferenceUnpickler(io.BytesIO(data), storages, legacy=False).load()
    except Invalid as invalid:
        return ("invalid", _ADDRESS.sub("0x", invalid.reason))
    except Exception as exc:  # noqa: BLE001 - every error becomes a reason, as in the check
        reason = f"data.pkl does not parse: {type(exc).__name__}: {exc}"
        return ("invalid", _ADDRESS.sub("0x", reason))
    return ("valid", storages)


def _outcome(data: bytes) -> tuple:
    try:
        storages = _fast_unpickle.load_storages(data, "data.pkl")
    except Invalid as invalid:
        return ("invalid", _ADDRESS.sub("0x", invalid.reason))
    return ("valid", storages)


def _mutations(data: bytes) -> list[bytes]:
    """Return `data` cut at every offset, and with each opcode dropped, doubled or replaced."""
    starts = [position for _op, _arg, position in pickletools.genops(data)]
    spans = list(zip(starts, starts[1:] + [len(data)]))
    opcodes = [ord(opcode.code) for opcode in pickletools.opcodes]
    mutated = [data[:length] for length in range(len(data))]
    for start, end in spans:
        mutated.append(data[:start] + data[end:])
        mutated.append(data[:end] + data[start:end] + data[end:])
        mutated.extend(data[:start] + bytes([code]) + data[start + 1 :] for code in opcodes)
    return mutated


# ---------------------------------------------------------------------------
# Reads


@pytest.fixture
def pread_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record (offset, bytes returned) for each os.pread call."""
    calls: list[tuple[int, int]] = []
    real_pread = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        data = real_pread(fd, length, offset)
        calls.append((offset, len(data)))
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    return calls


def test_small_file_read_once(tmp_path: Path, pread_calls: list) -> None:
    path = _save(tmp_path / "small.pt", {"w": torch.ones(8, 8), "step": 1})
    assert path.stat().st_size <= TAIL_WINDOW_BYTES
    verdict = check_file(None, str(path))
    assert verdict.valid, verdict.reason
    assert pread_calls == [(0, path.stat().st_size)]


def test_large_file_skips_tensor_data(tmp_path: Path, pread_calls: list) -> None:
    tensors = {"big": torch.ones(2**21), **{f"t{i}": torch.ones(3) for i in range(5)}}
    path = _save(tmp_path / "large.pt", tensors)
    verdict = check_file(None, str(path))
    assert verdict.valid, verdict.reason
    bytes_read = sum(length for _offset, length in pread_calls)
    assert bytes_read < TAIL_WINDOW_BYTES + 4096


def test_headers_both_sides_of_window(tmp_path: Path) -> None:
    """A damaged local header is found before the tail window and inside it."""
    tensors = {f"t{i}": torch.full((500,), float(i)) for i in range(60)}
    path = _save(tmp_path / "full.pt", tensors)
    data = path.read_bytes()
    window_start = len(data) - TAIL_WINDOW_BYTES
    with zipfile.ZipFile(path) as archive:
        storages = [info for info in archive.infolist() if "/data/" in info.filename]
    first, last = storages[0], storages[-1]
    assert first.header_offset < window_start
    assert last.header_offset > window_start
    assert check_file(None, str(path)).valid

    for info in (first, last):
        damaged = bytearray(data)
        damaged[info.header_offset : info.header_offset + 4] = bytes(4)
        path.write_bytes(bytes(damaged))
        verdict = check_file(None, str(path))
        assert verdict.reason == f"local header of {info.filename} has a bad signature"


def test_truncated_near_window_size(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((500,), float(i)) for i in range(60)}
    data = _save(tmp_path / "full.pt", tensors).read_bytes()
    assert len(data) > TAIL_WINDOW_BYTES + 300
    path = tmp_path / "cut.pt"
    for length in range(TAIL_WINDOW_BYTES - 300, TAIL_WINDOW_BYTES + 300):
        path.write_bytes(data[:length])
        verdict = check_file(None, str(path))
        assert verdict.reason == "truncated: end-of-central-directory record missing", length


def test_open_and_check_fstat_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One fstat before the check serves its type and size test, one after detects a change."""
    path = _save(tmp_path / "ckpt.pt", {"w": torch.ones(3)})
    calls: list[int] = []
    real_fstat = os.fstat

    def counting_fstat(fd: int) -> os.stat_result:
        calls.append(fd)
        return real_fstat(fd)

    monkeypatch.setattr(os, "fstat", counting_fstat)
    verdict, key = open_and_check(None, str(path))
    assert verdict.valid, verdict.reason
    assert key is not None
    assert len(calls) == 2


# ---------------------------------------------------------------------------
# Central directory


def _archive_with_duplicate() -> bytes:
    """Return a zip archive, made by zipfile, whose third record repeats the first name."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the repeated name
        archive.writestr("a/data.pkl", pickle.dumps(1, protocol=2))
        archive.writestr("a/version", "3\n")
        archive.writestr("a/data.pkl", pickle.dumps(2, protocol=2))
        archive.writestr("a/extra", "x")
    return buffer.getvalue()


def test_duplicate_name_reported(tmp_path: Path) -> None:
    path = tmp_path / "duplicate.pt"
    path.write_bytes(_archive_with_duplicate())
    assert check_file(None, str(path)).reason == "duplicate record a/data.pkl"


def test_directory_damage_before_duplicate(tmp_path: Path) -> None:
    """A damaged directory entry after a repeated name is the reason given.

    The check reports a repeated name only after it has parsed the whole directory.
    """
    data = bytearray(_archive_with_duplicate())
    cd_start = data.find(b"PK\x01\x02")
    last_entry = data.rfind(b"PK\x01\x02")
    data[last_entry : last_entry + 4] = bytes(4)
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(data))
    reason = check_file(None, str(path)).reason
    assert (
        reason == f"central directory header at offset {last_entry - cd_start} has a bad signature"
    )


# ---------------------------------------------------------------------------
# Fast path for data.pkl


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_fast_path_covers_torch_pickles(tmp_path: Path, shape: str) -> None:
    """torch.save's default pickles never need the slower full load."""
    data = _data_pkl(_save(tmp_path / "ckpt.pt", SHAPES[shape]()))
    assert _fast_unpickle._load_common_opcodes(data, {})


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("shape", ["tensor", "scalars", "module"])
def test_fast_path_matches_full_load(tmp_path: Path, shape: str, protocol: int) -> None:
    """Each mutated data.pkl gives the storages or reason of the standard library's load."""
    path = _save(tmp_path / "ckpt.pt", SHAPES[shape](), pickle_protocol=protocol)
    data = _data_pkl(path)
    mutated = _mutations(data)
    assert len(mutated) > 500
    for index, candidate in enumerate([data, *mutated]):
        assert _outcome(candidate) == _reference_outcome(candidate), index


# ---------------------------------------------------------------------------
# Shared stand-in classes


@pytest.fixture
def empty_stand_in_tables(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Give the test empty shared stand-in tables, so it neither reads nor fills the real ones."""
    shared: dict = {}
    monkeypatch.setattr(_unpickle, "_shared_stand_ins", shared)
    monkeypatch.setattr(_fast_unpickle, "_shared_stand_ins_by_line", {})
    return shared


def test_stand_ins_shared_across_checks(tmp_path: Path, empty_stand_in_tables: dict) -> None:
    path = _save(tmp_path / "ckpt.pt", {"w": torch.ones(3)})
    assert check_file(None, str(path)).valid
    stand_in = empty_stand_in_tables[("torch", "FloatStorage")]
    assert check_file(None, str(path)).valid
    assert empty_stand_in_tables[("torch", "FloatStorage")] is stand_in


def test_stand_ins_capped(tmp_path: Path, empty_stand_in_tables: dict) -> None:
    count = _unpickle._SHARED_STAND_INS_MAX + 100
    path = _save_globals(tmp_path / "many.pt", [("crafted", f"name{i}") for i in range(count)])
    verdict = check_file(None, str(path))
    assert verdict.reason == "complete zip archive, 0 storages"
    assert len(empty_stand_in_tables) == _unpickle._SHARED_STAND_INS_MAX
    assert len(_fast_unpickle._shared_stand_ins_by_line) <= _unpickle._SHARED_STAND_INS_MAX


def test_long_global_names_not_shared(tmp_path: Path, empty_stand_in_tables: dict) -> None:
    long_name = "n" * (_unpickle._SHARED_NAME_MAX + 1)
    path = _save_globals(tmp_path / "long.pt", [("crafted", long_name), (long_name, "short")])
    verdict = check_file(None, str(path))
    assert verdict.reason == "complete zip archive, 0 storages"
    assert empty_stand_in_tables == {}


def test_stand_ins_capped_across_threads(tmp_path: Path, empty_stand_in_tables: dict) -> None:
    half = _unpickle._SHARED_STAND_INS_MAX // 2 + 50
    paths = [
        _save_globals(tmp_path / f"{thread}.pt", [(f"m{thread}", f"n{i}") for i in range(half)])
        for thread in range(4)
    ]
    reasons: list[str] = []
    workers = [
        threading.Thread(target=lambda path=path: reasons.append(check_file(None, path).reason))
        for path in map(str, paths)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert reasons == ["complete zip archive, 0 storages"] * 4
    assert len(empty_stand_in_tables) == _unpickle._SHARED_STAND_INS_MAX
