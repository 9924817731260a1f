"""The validity check against torch.load itself on damaged real checkpoints.

A file that torch.load cannot load must never count as valid, or it could push out the
checkpoint a run needs to resume. The other direction, a loadable file called invalid, only
keeps a file and is allowed: the check is stricter than torch where torch.save never writes
what it rejects.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zipfile

import pytest
import torch

from watcher.validity import check_fd

# Offsets of fields in a central directory header.
_FLAGS = 8
_METHOD = 10
_COMPRESSED = 20
_UNCOMPRESSED = 24
_DISK = 34
_EXTERNAL = 38


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _optimizer_state() -> dict:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 7}


def _check(data: bytes) -> tuple[bool, str]:
    fd = os.memfd_create("checkpoint")
    try:
        os.write(fd, data)
        verdict = check_fd(fd)
    finally:
        os.close(fd)
    return verdict.valid, verdict.reason


def _torch_loads(data: bytes) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.load(io.BytesIO(data), weights_only=False)
        except Exception:  # noqa: BLE001 - any failure to load counts
            return False
    return True


def _central_entry(data: bytes, suffix: str) -> int:
    """Return the offset of the central directory header of the record ending with `suffix`."""
    position = data.find(b"PK\x01\x02")
    while position >= 0:
        (name_length,) = struct.unpack_from("<H", data, position + 28)
        if data[position + 46 : position + 46 + name_length].endswith(suffix.encode()):
            return position
        position = data.find(b"PK\x01\x02", position + 4)
    raise LookupError(suffix)


def _storage_data(data: bytes) -> set[int]:
    """Return the offsets of tensor bytes, which neither torch.load nor the check reads."""
    offsets: set[int] = set()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if "/data/" not in info.filename:
                continue
            name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
            start = info.header_offset + 30 + name_length + extra_length
            offsets.update(range(start, start + info.file_size))
    return offsets


@pytest.mark.parametrize("kind", ["linear", "optimizer"])
def test_no_flip_counts_unloadable(kind: str) -> None:
    """Every byte outside the tensor data, flipped three ways: no unloadable file is valid."""
    torch.manual_seed(0)
    good = _saved(torch.nn.Linear(4, 3).state_dict() if kind == "linear" else _optimizer_state())
    assert _check(good)[0]
    skipped = _storage_data(good)
    wrong = []
    for position in range(len(good)):
        if position in skipped:
            continue
        for mask in (0xFF, 0x01, 0x80):
            damaged = bytearray(good)
            damaged[position] ^= mask
            valid, _reason = _check(bytes(damaged))
            if valid and not _torch_loads(bytes(damaged)):
                wrong.append((position, mask))
    assert wrong == []


@pytest.mark.parametrize(
    ("record", "offset", "value", "reason"),
    [
        ("data/0", _METHOD, 1, "compressed with method 1"),
        ("version", _UNCOMPRESSED, 7, "inconsistent sizes"),
        ("byteorder", _COMPRESSED, 9, "inconsistent sizes"),
        ("data/0", _FLAGS, 0x2808, "encrypted or masked"),
        ("data.pkl", _FLAGS, 0x0809, "encrypted or masked"),
        ("data/0", _FLAGS, 0x0828, "encrypted or masked"),
        ("data/0", _FLAGS, 0x0848, "encrypted or masked"),
        ("data/0", _DISK, 2, "multi-disk"),
        ("byteorder", _EXTERNAL, 0x10, "marked as a directory"),
    ],
)
def test_directory_field_invalid(record: str, offset: int, value: int, reason: str) -> None:
    """Central directory fields that torch's reader rejects make the file invalid."""
    data = bytearray(_saved({"w": torch.ones(4)}))
    entry = _central_entry(bytes(data), "/" + record)
    width = 4 if offset in (_COMPRESSED, _UNCOMPRESSED, _EXTERNAL) else 2
    data[entry + offset : entry + offset + width] = value.to_bytes(width, "little")

    valid, text = _check(bytes(data))

    assert not _torch_loads(bytes(data))
    assert not valid
    assert reason in text


def _rewritten(replace: dict[str, bytes]) -> bytes:
    """Return a torch checkpoint rewritten by zipfile with some records replaced, CRCs correct."""
    source = zipfile.ZipFile(io.BytesIO(_saved({"w": torch.ones(4)})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for info in source.infolist():
            name = info.filename.split("/", 1)[1]
            archive.writestr(info.filename, replace.get(name, source.read(info.filename)))
    return out.getvalue()


@pytest.mark.parametrize(
    ("record", "content", "reason"),
    [
        ("byteorder", b"Little", "not b'little' or b'big'"),
        ("byteorder", b"little\n", "not b'little' or b'big'"),
        ("version", b"x3", "not a file format version"),
        ("version", b"0\n", "not a file format version"),
        ("version", b"", "not a file format version"),
        ("version", b"99999999999999999999\n", "not a file format version"),
        (".storage_alignment", b"x", "not a number"),
        (".data/serialization_id", b"\xff\xfe", "not UTF-8"),
    ],
)
def test_small_record_content_invalid(record: str, content: bytes, reason: str) -> None:
    """A record that torch.load parses, with content it rejects, makes the file invalid."""
    data = _rewritten({record: content})

    valid, text = _check(data)

    assert not _torch_loads(data)
    assert not valid
    assert reason in text


@pytest.mark.parametrize(
    ("record", "content"),
    [("version", b" 3"), ("version", b"3x"), (".storage_alignment", b" 64 ")],
)
def test_small_record_content_valid(record: str, content: bytes) -> None:
    """Content that torch.load parses the same way stays valid."""
    data = _rewritten({record: content})

    assert _torch_loads(data)
    assert _check(data)[0]


def test_small_record_damaged_invalid() -> None:
    """A damaged byte in a record that torch.load parses is found by parsing it."""
    data = bytearray(_saved({"w": torch.ones(4)}))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo("archive/byteorder")
    start = (
        info.header_offset
        + 30
        + len(info.filename)
        + struct.unpack_from("<H", data, info.header_offset + 28)[0]
    )
    data[start] ^= 0x20  # "little" becomes "Little"

    valid, text = _check(bytes(data))

    assert not valid
    assert "archive/byteorder is b'Little'" in text


@pytest.mark.parametrize("extra", [b"x", b"\n" * 100, b"PK\x05\x06"])
def test_bytes_after_end_invalid(extra: bytes) -> None:
    """torch.load skips bytes added after the end record, but torch.save never writes them."""
    data = _saved({"w": torch.ones(4)}) + extra

    valid, text = _check(data)

    assert not valid
    assert text.startswith(f"{len(extra)} byte")
    assert text.endswith("after the end-of-central-directory record")
