"""Tests for watcher.validity against real files written by torch.save."""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import resource
import signal
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from helpers_corpus import crafted_pickle_module

from watcher import validity
from watcher.validity import ValidityCache, check_fd, check_file, stat_key

# ---------------------------------------------------------------------------
# Helpers


def _state_dict_with_optimizer() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}


def _shared_storage() -> dict:
    base = torch.arange(12.0)
    return {"base": base, "row": base.view(3, 4)[1], "tail": base[6:]}


# Objects to save, with the number of storages each one has. The optimizer case has 4
# parameters, and Adam adds step, exp_avg and exp_avg_sq tensors for each of them.
SHAPES = {
    "tensor": (lambda: torch.randn(5, 6), 1),
    "optimizer": (_state_dict_with_optimizer, 16),
    "nested": (lambda: {"a": {"b": {"c": torch.ones(2)}}, "d": [torch.zeros(3)]}, 2),
    "shared_storage": (_shared_storage, 1),
    "zero_size": (lambda: {"empty": torch.zeros(0), "flat": torch.zeros(0, 5)}, 2),
    "no_tensors": (lambda: {"step": 7, "lr": 0.1, "names": ["a", "b"]}, 0),
    "small_dtypes": (
        lambda: {
            "bf16": torch.ones(3, dtype=torch.bfloat16),
            "int8": torch.ones(4, dtype=torch.int8),
            "bool": torch.ones(5, dtype=torch.bool),
        },
        3,
    ),
    "untyped_dtypes": (
        lambda: {
            "f8": torch.zeros(3, dtype=torch.float8_e4m3fn),
            "u16": torch.zeros(3, dtype=torch.uint16),
        },
        2,
    ),
}


def _save(path: Path, obj: object, **kwargs) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _small_checkpoint(path: Path) -> Path:
    obj = {"w": torch.randn(3, 4), "b": torch.zeros(4), "i": torch.arange(5), "step": 2}
    return _save(path, obj)


def _check_bytes(path: Path, data: bytes) -> validity.Verdict:
    path.write_bytes(data)
    return check_file(None, str(path))


def _valid_offsets(path: Path, data: bytes, lengths) -> list[int]:
    """Write each prefix of `data` to `path` and return the lengths that check as valid."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, data, 0)
        accepted = []
        for length in lengths:
            os.ftruncate(fd, length)
            os.pwrite(fd, data[:length], 0)
            if check_fd(fd).valid:
                accepted.append(length)
        return accepted
    finally:
        os.close(fd)


def _data_start(data: bytes, info: zipfile.ZipInfo) -> int:
    """Return where a record's data starts, after its local header."""
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + 30 + name_length + extra_length


def _record_boundaries(path: Path) -> set[int]:
    """Return offsets where zip structures start or end in a zip file written by torch."""
    data = path.read_bytes()
    offsets = set()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            data_start = _data_start(data, info)
            offsets.update({info.header_offset, data_start, data_start + info.compress_size})
        cd_offset = archive.start_dir
    position = cd_offset
    while data[position : position + 4] == b"PK\x01\x02":
        offsets.add(position)
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, position + 28)
        position += 46 + name_length + extra_length + comment_length
    offsets.update({position, len(data) - 42, len(data) - 22})
    around = {offset + delta for offset in offsets for delta in (-1, 0, 1)}
    return {offset for offset in around if 0 <= offset < len(data)}


def _storage_pickle(key: str, numel: int, type_name: str = "FloatStorage") -> bytes:
    """Return a protocol 2 pickle of one storage id, as torch writes it in data.pkl."""
    key_bytes = key.encode()
    return (
        b"\x80\x02(X\x07\x00\x00\x00storage"
        + b"ctorch\n"
        + type_name.encode()
        + b"\nX"
        + struct.pack("<I", len(key_bytes))
        + key_bytes
        + b"X\x03\x00\x00\x00cpuJ"
        + struct.pack("<i", numel)
        + b"tQ."
    )


def _with_last_header_offset(data: bytes, offset: int) -> bytes:
    """Return the torch zip archive `data` with a zip64 header offset for its last record.

    The last central directory entry gets 0xFFFFFFFF as offset and a zip64 extra field that
    contains `offset`. The zip64 end record, its locator and the end record then describe the
    longer central directory.
    """
    (zip64_end,) = struct.unpack_from("<Q", data, len(data) - 42 + 8)
    cd_size, cd_offset = struct.unpack_from("<QQ", data, zip64_end + 40)
    directory = bytearray(data[cd_offset : cd_offset + cd_size])
    last = directory.rfind(b"PK\x01\x02")
    extra_length, comment_length = struct.unpack_from("<HH", directory, last + 30)
    assert comment_length == 0  # so the extra field may grow at the end of the directory
    struct.pack_into("<H", directory, last + 30, extra_length + 12)
    struct.pack_into("<I", directory, last + 42, 0xFFFFFFFF)
    directory += struct.pack("<HHQ", 1, 8, offset)
    end = bytearray(data[zip64_end:])
    struct.pack_into("<QQ", end, 40, len(directory), cd_offset)
    struct.pack_into("<Q", end, 56 + 8, cd_offset + len(directory))
    struct.pack_into("<I", end, 56 + 20 + 12, len(directory))
    return data[:cd_offset] + bytes(directory) + bytes(end)


class _ExecutesOnLoad:
    """Object whose pickle calls os.system on load, to prove the check never runs it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------
# Zip format


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_zip_shape_valid(tmp_path: Path, shape: str) -> None:
    make, storages = SHAPES[shape]
    path = _save(tmp_path / "ckpt.pt", make(), _use_new_zipfile_serialization=True)
    verdict = check_file(None, str(path))
    assert verdict.valid, verdict.reason
    assert verdict.reason == f"complete zip archive, {storages} storage" + (
        "" if storages == 1 else "s"
    )
    torch.load(path, weights_only=True)


def test_zip_pickle_protocol_4_valid(tmp_path: Path) -> None:
    path = _save(tmp_path / "p4.pt", _state_dict_with_optimizer(), pickle_protocol=4)
    verdict = check_file(None, str(path))
    assert verdict.valid, verdict.reason


def test_zip_without_crc_valid(tmp_path: Path) -> None:
    """torch.save writes CRC 0 when CRC computation is off, and torch.load accepts that."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        path = _small_checkpoint(tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(previous)
    with zipfile.ZipFile(path) as archive:
        assert {info.CRC for info in archive.infolist()} == {0}
    verdict = check_file(None, str(path))
    assert verdict.valid, verdict.reason


def test_zip_truncated_every_offset(tmp_path: Path) -> None:
    data = _small_checkpoint(tmp_path / "full.pt").read_bytes()
    accepted = _valid_offsets(tmp_path / "cut.pt", data, range(len(data)))
    assert accepted == []


def test_zip_truncated_at_boundaries(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((100 + i,), float(i)) for i in range(20)}
    path = _save(tmp_path / "full.pt", tensors)
    data = path.read_bytes()
    lengths = _record_boundaries(path) | set(random.Random(0).sample(range(len(data)), 300))
    assert len(lengths) > 300
    accepted = _valid_offsets(tmp_path / "cut.pt", data, sorted(lengths))
    assert accepted == []


def test_zip_zero_filled_tail(tmp_path: Path) -> None:
    data = bytearray(_small_checkpoint(tmp_path / "full.pt").read_bytes())
    data[-512:] = bytes(512)
    verdict = _check_bytes(tmp_path / "hole.pt", bytes(data))
    assert not verdict.valid
    assert "truncated" in verdict.reason


def test_zip_zero_filled_data_pkl(tmp_path: Path) -> None:
    path = _small_checkpoint(tmp_path / "full.pt")
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    data = bytearray(path.read_bytes())
    start = _data_start(bytes(data), info)
    data[start : start + 64] = bytes(64)
    verdict = _check_bytes(tmp_path / "hole.pt", bytes(data))
    assert not verdict.valid
    assert "CRC-32 mismatch" in verdict.reason


def test_zip_damaged_local_header(tmp_path: Path) -> None:
    path = _small_checkpoint(tmp_path / "full.pt")
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/1"))
    data = bytearray(path.read_bytes())
    data[info.header_offset : info.header_offset + 4] = bytes(4)
    verdict = _check_bytes(tmp_path / "damaged.pt", bytes(data))
    assert not verdict.valid
    assert verdict.reason.endswith("data/1 has a bad signature")


def test_zip_interrupted_between_storages(tmp_path: Path) -> None:
    """A signal handler raising KeyboardInterrupt while torch.save writes data/3."""
    path = tmp_path / "interrupted.pt"
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(8)}

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    def trace_calls(frame, event, arg):
        if frame.f_code is not torch.serialization._save.__code__:
            return None

        def trace_lines(frame, event, arg):
            if event == "line" and frame.f_locals.get("name") == "data/3":
                signal.raise_signal(signal.SIGALRM)
            return trace_lines

        return trace_lines

    previous_handler = signal.signal(signal.SIGALRM, raise_interrupt)
    previous_trace = sys.gettrace()
    try:
        sys.settrace(trace_calls)
        with pytest.raises(KeyboardInterrupt):
            torch.save(tensors, path)
    finally:
        sys.settrace(previous_trace)
        signal.signal(signal.SIGALRM, previous_handler)

    with zipfile.ZipFile(path) as archive:
        names = {name.partition("/")[2] for name in archive.namelist()}
        assert archive.testzip() is None
    assert "data/2" in names
    assert "data/3" not in names
    verdict = check_file(None, str(path))
    assert not verdict.valid
    assert verdict.reason == "storage data/3 named in data.pkl has no record"


class _InterruptingFile(io.FileIO):
    """Binary file whose write raises KeyboardInterrupt once past `limit` bytes."""

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(path, "wb")
        self.limit = limit
        self.fired = False

    def write(self, data) -> int:
        if not self.fired and self.tell() > self.limit:
            self.fired = True
            raise KeyboardInterrupt
        return super().write(data)


def test_zip_interrupted_inside_write(tmp_path: Path) -> None:
    """KeyboardInterrupt inside a storage write leaves torch unable to finish the archive."""
    path = tmp_path / "interrupted.pt"
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(8)}
    with _InterruptingFile(path, 12000) as file, pytest.raises((KeyboardInterrupt, RuntimeError)):
        torch.save(tensors, file)
    assert path.stat().st_size > 12000
    verdict = check_file(None, str(path))
    assert not verdict.valid
    assert verdict.reason == "truncated: end-of-central-directory record missing"


def test_zip_missing_storage_record(tmp_path: Path) -> None:
    module = crafted_pickle_module(_storage_pickle("7", 4))
    path = _save(tmp_path / "crafted.pt", torch.zeros(4), pickle_module=module)
    verdict = check_file(None, str(path))
    assert not verdict.valid
    assert verdict.reason == "storage data/7 named in data.pkl has no record"


def test_zip_storage_record_too_small(tmp_path: Path) -> None:
    module = crafted_pickle_module(_storage_pickle("0", 5))
    path = _save(tmp_path / "crafted.pt", torch.zeros(4), pickle_module=module)
    verdict = check_file(None, str(path))
    assert not verdict.valid
    assert verdict.reason.startswith("storage data/0 has 16 bytes, data.pkl expects 20")


def test_zip_storage_record_too_long(tmp_path: Path) -> None:
    """torch.load raises on a record longer than numel * element size, so it is invalid."""
    module = crafted_pickle_module(_storage_pickle("0", 3))
    path = _save(tmp_path / "crafted.pt", torch.zeros(4), pickle_module=module)
    verdict = check_file(None, str(path))
    assert not verdict.valid
    assert verdict.reason.startswith("storage data/0 has 16 bytes, data.pkl expects 12")


def test_zip_crafted_storage_pickle_valid(tmp_path: Path) -> None:
    """Control for the crafted cases: the same payload with the right numel is valid."""
    module = crafted_pickle_module(_storage_pickle("0", 4))
    path = _save(tmp_path / "crafted.pt", torch.zeros(4), pickle_module=module)
    verdict = check_file(None, str(path))
    assert verdict.valid, verdict.reason


def test_zip_pickle_code_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = _save(tmp_path / "evil.pt", {"x": _ExecutesOnLoad(marker), "w": torch.ones(2)})
    verdict = check_file(None, str(path))
    assert verdict.valid, verdict.reason
    assert not marker.exists()


def test_zip_memo_index_bomb(tmp_path: Path) -> None:
    """A BINPUT to index 2**32 - 16 must not make the check allocate a memo table for it."""
    payload = b"\x80\x02N" + b"r" + struct.pack("<I", 0xFFFFFFF0) + b"."
    path = _save(tmp_path / "bomb.pt", None, pickle_module=crafted_pickle_module(payload))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    verdict = check_file(None, str(path))
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert verdict.valid, verdict.reason
    assert peak_after - peak_before < 100 * 1024  # ru_maxrss is in KiB on Linux


def test_zip_not_from_torch(tmp_path: Path) -> None:
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    verdict = check_file(None, str(path))
    assert not verdict.valid
    assert verdict.reason.startswith("not a torch archive")


def test_zip_torch_names_from_zipfile(tmp_path: Path) -> None:
    """An archive made by zipfile with torch's record names loads with torch.load, so it counts."""
    path = tmp_path / "mimic.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mimic/data.pkl", pickle.dumps({"a": 1}, protocol=2))
        archive.writestr("mimic/version", "3\n")

    assert torch.load(path, weights_only=True) == {"a": 1}
    assert check_file(None, str(path)).valid


def test_zip_without_zip64_records(tmp_path: Path) -> None:
    """A real checkpoint rewritten by zipfile, which writes no zip64 records, is still checked."""
    original = _small_checkpoint(tmp_path / "original.pt")
    path = tmp_path / "plain.pt"
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info.filename))
    data = path.read_bytes()

    assert torch.load(path, weights_only=True).keys() == torch.load(original).keys()
    assert check_file(None, str(path)).valid
    assert _valid_offsets(path, data, range(len(data) - 300, len(data))) == []


def test_zip64_header_offset_past_max(tmp_path: Path) -> None:
    """A zip64 record offset beyond what os.pread accepts makes the file invalid, not an error."""
    data = _small_checkpoint(tmp_path / "ckpt.pt").read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        real_offset = archive.infolist()[-1].header_offset
    control = _check_bytes(tmp_path / "control.pt", _with_last_header_offset(data, real_offset))
    assert control.valid, control.reason

    verdict = _check_bytes(tmp_path / "crafted.pt", _with_last_header_offset(data, 2**64 - 1))
    assert not verdict.valid
    assert verdict.reason.startswith("truncated: local header of ")
    assert verdict.reason.endswith(f"at byte {2**64 - 1} runs past the end of the file")


# ---------------------------------------------------------------------------
# Legacy format


LEGACY_SHAPES = {
    "tensor": (lambda: torch.randn(5, 6), 1),
    "optimizer": (_state_dict_with_optimizer, 16),
    "shared_storage": (_shared_storage, 1),
    "zero_size": (lambda: {"empty": torch.zeros(0), "w": torch.ones(3)}, 2),
    "no_tensors": (lambda: {"step": 7}, 0),
    "small_dtypes": (
        lambda: {
            "bf16": torch.ones(3, dtype=torch.bfloat16),
            "bool": torch.ones(2, dtype=torch.bool),
        },
        2,
    ),
    "module": (lambda: torch.nn.Linear(2, 3), 2),
}


@pytest.mark.parametrize("shape", sorted(LEGACY_SHAPES))
def test_legacy_shape_valid(tmp_path: Path, shape: str) -> None:
    make, storages = LEGACY_SHAPES[shape]
    path = _save(tmp_path / "old.pt", make(), _use_new_zipfile_serialization=False)
    verdict = check_file(None, str(path))
    assert verdict.valid, verdict.reason
    assert verdict.reason.startswith(f"complete legacy file, {storages} storage")
    torch.load(path, weights_only=False)


def test_legacy_pickle_protocol_4_valid(tmp_path: Path) -> None:
    obj = _state_dict_with_optimizer()
    path = _save(tmp_path / "old.pt", obj, _use_new_zipfile_serialization=False, pickle_protocol=4)
    verdict = check_file(None, str(path))
    assert verdict.valid, verdict.reason


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "float8_e4m3fn"])
def test_legacy_untyped_storage_invalid(tmp_path: Path, dtype: str) -> None:
    """torch.save writes these dtypes in the legacy format but torch.load cannot read them."""
    tensor = torch.zeros(3, dtype=getattr(torch, dtype))
    path = _save(tmp_path / "old.pt", {"t": tensor}, _use_new_zipfile_serialization=False)

    verdict = check_file(None, str(path))

    with pytest.raises(AttributeError):
        torch.load(path, weights_only=False)
    assert not verdict.valid
    assert "UntypedStorage" in verdict.reason


def test_legacy_truncated_every_offset(tmp_path: Path) -> None:
    obj = {"w": torch.randn(3, 4), "b": torch.zeros(0), "i": torch.arange(5)}
    path = _save(tmp_path / "full.pt", obj, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    accepted = _valid_offsets(tmp_path / "cut.pt", data, range(len(data)))
    assert accepted == []


def test_legacy_trailing_bytes_invalid(tmp_path: Path) -> None:
    """torch.save never writes past the last storage, so trailing bytes mean another writer."""
    path = _save(tmp_path / "full.pt", torch.ones(4), _use_new_zipfile_serialization=False)
    verdict = _check_bytes(tmp_path / "tail.pt", path.read_bytes() + b"garbage")
    assert not verdict.valid
    assert verdict.reason == "7 unexpected bytes after the last storage"


def test_legacy_size_header_mismatch(tmp_path: Path) -> None:
    path = _save(tmp_path / "full.pt", torch.ones(4), _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    header = len(data) - 16 - 8
    assert struct.unpack_from("<q", data, header) == (4,)
    data[header : header + 8] = struct.pack("<q", 2)
    verdict = _check_bytes(tmp_path / "bad.pt", bytes(data))
    assert not verdict.valid
    assert verdict.reason.endswith("has a size header of 2 elements, but the pickle expects 4")


# ---------------------------------------------------------------------------
# Other content


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"PK\x03", "truncated: 3 bytes"),
        (b"step,loss\n1,0.5\n", "not a torch checkpoint: no zip or legacy torch signature"),
        (
            random.Random(1).randbytes(4096),
            "not a torch checkpoint: no zip or legacy torch signature",
        ),
        (b"\x80\x02K\x01.", "not a torch checkpoint: legacy magic number missing"),
    ],
    ids=["empty", "short_zip_magic", "text", "random", "plain_pickle"],
)
def test_other_content_invalid(tmp_path: Path, content: bytes, reason: str) -> None:
    verdict = _check_bytes(tmp_path / "other.pt", content)
    assert not verdict.valid
    assert verdict.reason == reason


def test_check_file_folder(tmp_path: Path) -> None:
    verdict = check_file(None, str(tmp_path))
    assert not verdict.valid
    assert verdict.reason == "not a regular file: directory"


def test_check_file_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    results = []
    worker = threading.Thread(target=lambda: results.append(check_file(None, str(fifo))))
    worker.daemon = True
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert results == [validity.Verdict(False, "not a regular file: FIFO")]


def test_check_file_symlink_rejected(tmp_path: Path) -> None:
    target = _small_checkpoint(tmp_path / "real.pt")
    (tmp_path / "link.pt").symlink_to(target)
    assert check_file(None, str(target)).valid
    verdict = check_file(None, str(tmp_path / "link.pt"))
    assert not verdict.valid
    assert verdict.reason.endswith("(symbolic links are not followed)")


def test_check_file_relative_to_dir_fd(tmp_path: Path) -> None:
    _small_checkpoint(tmp_path / "a.pt")
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert check_file(dir_fd, "a.pt").valid
        assert check_file(dir_fd, "missing.pt").reason == "unreadable: No such file or directory"
    finally:
        os.close(dir_fd)


def test_check_fd_keeps_offset_and_fd(tmp_path: Path) -> None:
    path = _small_checkpoint(tmp_path / "a.pt")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 7, os.SEEK_SET)
        assert check_fd(fd).valid
        assert os.lseek(fd, 0, os.SEEK_CUR) == 7
    finally:
        os.close(fd)


def test_check_file_keeps_access_time(tmp_path: Path) -> None:
    """The check opens with O_NOATIME, so reading does not update the access time.

    An access time older than the mtime makes a relatime mount update it on any read.
    """
    path = _small_checkpoint(tmp_path / "a.pt")
    old_atime_ns = 10**9
    os.utime(path, ns=(old_atime_ns, path.stat().st_mtime_ns))
    assert check_file(None, str(path)).valid
    assert path.stat().st_atime_ns == old_atime_ns


def _check_as_nobody(dir_fd: int, name: str) -> str:
    """Check `name` in a forked child that runs as uid 65534, and return the child's report.

    The report starts with "EPERM; " when the child may not open the file with O_NOATIME, and
    ends with the verdict.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            os.setuid(65534)
            report = []
            try:
                os.close(os.open(name, os.O_RDONLY | os.O_NOATIME, dir_fd=dir_fd))
            except PermissionError as exc:
                report.append(errno.errorcode[exc.errno])
            verdict = check_file(dir_fd, name)
            report.append(f"{verdict.valid} {verdict.reason}")
            os.write(write_end, "; ".join(report).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode()
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return report


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user")
def test_check_file_other_owner_without_noatime(tmp_path: Path) -> None:
    """A user who does not own the file gets EPERM for O_NOATIME, so the check opens without it."""
    _small_checkpoint(tmp_path / "a.pt")
    (tmp_path / "a.pt").chmod(0o644)
    tmp_path.chmod(0o755)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        report = _check_as_nobody(dir_fd, "a.pt")
    finally:
        os.close(dir_fd)
    assert report == "EPERM; True complete zip archive, 3 storages"


# ---------------------------------------------------------------------------
# ValidityCache


@pytest.fixture
def check_fd_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the reads of an open file's contents, as made by the cache."""
    calls: list[int] = []
    real_check_open_file = validity.checks._check_open_file

    def counting_check_open_file(fd: int, st: os.stat_result) -> validity.Verdict:
        calls.append(fd)
        return real_check_open_file(fd, st)

    monkeypatch.setattr(validity.checks, "_check_open_file", counting_check_open_file)
    return calls


def test_cache_unchanged_file_read_once(tmp_path: Path, check_fd_calls: list[int]) -> None:
    path = _small_checkpoint(tmp_path / "a.pt")
    cache = ValidityCache(settle_seconds=0)
    first = cache.check(None, str(path), os.stat(path))
    second = cache.check(None, str(path), os.stat(path))
    assert first.valid
    assert second == first
    assert len(check_fd_calls) == 1


def test_cache_rewrite_same_size_and_mtime(tmp_path: Path) -> None:
    """Damaging the file in place and restoring its mtime still changes ctime, so it is re-read."""
    path = _small_checkpoint(tmp_path / "a.pt")
    cache = ValidityCache(settle_seconds=0)
    before = os.stat(path)
    assert cache.check(None, str(path), before).valid

    damaged = bytearray(path.read_bytes())
    damaged[-22:] = bytes(22)
    path.write_bytes(bytes(damaged))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert not cache.check(None, str(path), after).valid


def test_cache_skips_file_changed_since_stat(tmp_path: Path, check_fd_calls: list[int]) -> None:
    path = _small_checkpoint(tmp_path / "a.pt")
    stale = os.stat(path)
    _save(path, {"other": torch.ones(100)})
    cache = ValidityCache(settle_seconds=0)
    assert cache.check(None, str(path), stale).valid
    assert len(cache) == 0
    cache.check(None, str(path), stale)
    assert len(check_fd_calls) == 2


def test_cache_skips_recent_file(tmp_path: Path) -> None:
    path = _small_checkpoint(tmp_path / "a.pt")
    cache = ValidityCache(settle_seconds=3600)
    assert cache.check(None, str(path), os.stat(path)).valid
    assert len(cache) == 0


def test_cache_forget_missing(tmp_path: Path) -> None:
    kept = _small_checkpoint(tmp_path / "kept.pt")
    gone = _small_checkpoint(tmp_path / "gone.pt")
    cache = ValidityCache(settle_seconds=0)
    for path in (kept, gone):
        cache.check(None, str(path), os.stat(path))
    assert len(cache) == 2
    assert cache.forget_missing({stat_key(os.stat(kept))}) == 1
    assert len(cache) == 1


def test_cache_max_entries(tmp_path: Path) -> None:
    cache = ValidityCache(max_entries=2, settle_seconds=0)
    for index in range(3):
        path = _small_checkpoint(tmp_path / f"{index}.pt")
        cache.check(None, str(path), os.stat(path))
    assert len(cache) == 2


# ---------------------------------------------------------------------------
# Import


def test_import_without_torch() -> None:
    code = "import sys, watcher.validity; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"
