"""Decide whether a file is a complete ``torch.save`` checkpoint, without importing torch.

Two formats are recognised:

* the zip archive that ``torch.save`` writes by default (torch >= 1.6), and
* the legacy format of ``torch.save(..., _use_new_zipfile_serialization=False)``: a sequence
  of pickles followed by the raw bytes of each storage.

The check reads the archive's end records, its central directory, one local header per
record and the pickled object structure (``data.pkl``), but never the tensor data, so its
cost grows with the number of storages and not with their size. It checks that the file
is complete and that every storage the pickle names has its bytes in the file. It does not
checksum tensor data: a zero-filled hole inside tensor bytes (what power loss without fsync
can leave) goes unnoticed unless it also covers a header, ``data.pkl`` or the end records.

Pickles are never loaded with ``pickle.load``. A restricted unpickler turns every global
into an inert stand-in and records only the storage ids, so a file cannot run code here.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import stat
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

_log = logging.getLogger(__name__)

# Largest pickle this check reads: data.pkl of a zip archive, or the leading pickles of a
# legacy file. Such a pickle contains only the object structure, about 80 bytes per tensor
# with torch 2.13, so real checkpoints stay far below the limit. A larger one is invalid.
MAX_PICKLE_BYTES = 256 * 1024 * 1024

# Bytes per element of each storage type that torch 2.13 pickles (torch.storage
# _dtype_to_storage_type_map and torch._utils._element_size). Dtypes without a typed
# storage class (float8, uint16, complex32, ...) are pickled as UntypedStorage, whose
# element count is a byte count.
STORAGE_ELEMENT_SIZES = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexDoubleStorage": 16,
    "ComplexFloatStorage": 8,
    "QInt8Storage": 1,
    "QInt32Storage": 4,
    "QUInt8Storage": 1,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
    "UntypedStorage": 1,
}

_ZIP_LOCAL_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
# PROTO 2, LONG1 of 10 bytes: how every legacy file written with the default protocol starts.
_LEGACY_PREFIX = b"\x80\x02\x8a\x0a"


@dataclass(frozen=True)
class Verdict:
    """Outcome of a check: whether the file is a complete checkpoint, and a short reason."""

    valid: bool
    reason: str


class _Invalid(Exception):
    """Raised inside the check with the reason the file is not a complete checkpoint."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    chunks = []
    remaining = length
    while remaining > 0:
        chunk = os.pread(fd, remaining, offset + length - remaining)
        if not chunk:
            raise _Invalid(f"truncated: {what} at byte {offset} runs past the end of the file")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------
# Restricted unpickler


class _Opaque:
    """Inert stand-in for the globals, dicts and sets of a pickle and the objects built from them.

    It accepts any constructor arguments and ignores all state set on it.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, item) -> None:
        pass

    def extend(self, items) -> None:
        pass

    def add(self, item) -> None:
        pass


@dataclass(frozen=True)
class _StorageRef:
    """One storage id found in a pickle: key, storage class name and element count."""

    key: str
    type_name: str | None
    numel: int


def _storage_type_name(storage_type: object) -> str | None:
    """Return the class name of a torch storage stand-in, or None for anything else."""
    module = getattr(storage_type, "pickle_module", "")
    if module != "torch" and not module.startswith("torch."):
        return None
    return getattr(storage_type, "pickle_name", None)


def _as_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return None


def _reject_opcode(unpickler: pickle._Unpickler) -> None:
    raise _Invalid("pickle uses a protocol 5 buffer opcode, which torch.save never writes")


def _push_opaque(unpickler: pickle._Unpickler) -> None:
    unpickler.append(_Opaque())


def _push_opaque_after_mark(unpickler: pickle._Unpickler) -> None:
    unpickler.pop_mark()
    unpickler.append(_Opaque())


# pickle._Unpickler is the pure-Python unpickler of the standard library. The C unpickler is
# not used because it sizes its memo table from the largest BINPUT index in the input, so a
# 12-byte pickle can make it allocate gigabytes. Dicts and sets become stand-ins as well:
# their contents are never needed, and crafted keys with equal hashes would make building
# them quadratic. BYTEARRAY8 would allocate its declared length before reading any data.
class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that builds only stand-ins and records the storage ids it meets."""

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.EMPTY_DICT[0]] = _push_opaque
    dispatch[pickle.DICT[0]] = _push_opaque_after_mark
    dispatch[pickle.EMPTY_SET[0]] = _push_opaque
    dispatch[pickle.FROZENSET[0]] = _push_opaque_after_mark
    dispatch[pickle.BYTEARRAY8[0]] = _reject_opcode
    dispatch[pickle.NEXT_BUFFER[0]] = _reject_opcode
    dispatch[pickle.READONLY_BUFFER[0]] = _reject_opcode

    def __init__(self, file, storages: dict[str, _StorageRef], legacy: bool) -> None:
        super().__init__(file, encoding="latin-1")
        self._storages = storages
        self._legacy = legacy
        self._globals: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> type:
        key = (module, name)
        if key not in self._globals:
            attributes = {"pickle_module": module, "pickle_name": name}
            self._globals[key] = type("OpaqueGlobal", (_Opaque,), attributes)
        return self._globals[key]

    def persistent_load(self, pid: object) -> _Opaque | type[_Opaque]:
        if not isinstance(pid, tuple) or not pid:
            raise _Invalid(f"unexpected persistent id in pickle: {type(pid).__name__}")
        kind = _as_text(pid[0])
        if self._legacy and kind == "module":
            # The id stands for the class of a pickled nn.Module, so it must be a class that
            # the NEWOBJ opcode can instantiate.
            return _Opaque
        expected_length = 6 if self._legacy else 5
        if kind != "storage" or len(pid) != expected_length:
            raise _Invalid(f"unexpected persistent id in pickle: kind {kind!r}, {len(pid)} fields")
        self._record_storage(pid[1], pid[2], pid[4])
        return _Opaque()

    def _record_storage(self, storage_type: object, key: object, numel: object) -> None:
        key_text = _as_text(key)
        if key_text is None or type(numel) is not int or numel < 0:
            raise _Invalid(f"malformed storage id in pickle: key {key!r}, numel {numel!r}")
        # torch's loaders size a storage from its first reference and reuse it after.
        if key_text not in self._storages:
            type_name = _storage_type_name(storage_type)
            self._storages[key_text] = _StorageRef(key_text, type_name, numel)


def _unpickle(file, storages: dict[str, _StorageRef], legacy: bool, what: str) -> object:
    """Load one pickle from `file` with the restricted unpickler, adding to `storages`."""
    try:
        return _RestrictedUnpickler(file, storages, legacy).load()
    except (_Invalid, OSError):
        raise
    except Exception as exc:
        # A damaged pickle can raise almost any exception type from the unpickler.
        raise _Invalid(f"{what} does not parse: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------------
# Zip archives

_EOCD = struct.Struct("<IHHHHIIH")
_EOCD_SIGNATURE = 0x06054B50
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_ZIP64_LOCATOR_SIGNATURE = 0x07064B50
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_ZIP64_EOCD_SIGNATURE = 0x06064B50
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")
_CENTRAL_HEADER_SIGNATURE = 0x02014B50
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_HEADER_SIGNATURE = 0x04034B50
_ZIP64_EXTRA_ID = 0x0001
_MAX16 = 0xFFFF
_MAX32 = 0xFFFFFFFF


@dataclass
class _ZipRecord:
    """One central directory entry; data_offset is filled in from its local header."""

    name: str
    raw_name: bytes
    flags: int
    method: int
    crc: int
    compressed_size: int
    uncompressed_size: int
    header_offset: int
    data_offset: int = -1


@dataclass(frozen=True)
class _ZipEnd:
    """Offset, size and entry count of the central directory, read from the end records."""

    cd_offset: int
    cd_size: int
    entries: int


def _read_zip_end(fd: int, size: int) -> _ZipEnd:
    """Parse the zip64 end record, its locator and the end record, which torch writes last."""
    tail_length = _EOCD.size + _ZIP64_LOCATOR.size
    if size < tail_length:
        raise _Invalid("truncated: end-of-central-directory record missing")
    tail = _pread_exact(fd, tail_length, size - tail_length, "end records")
    eocd = _EOCD.unpack_from(tail, _ZIP64_LOCATOR.size)
    signature, disk, cd_disk, disk_entries, entries16, cd_size32, cd_offset32, comment = eocd
    if signature != _EOCD_SIGNATURE:
        raise _Invalid("truncated: end-of-central-directory record missing")
    if comment != 0 or disk not in (0, _MAX16) or cd_disk not in (0, _MAX16):
        raise _Invalid("end-of-central-directory record is damaged or not from torch.save")

    locator_signature, locator_disk, zip64_offset, disks = _ZIP64_LOCATOR.unpack_from(tail)
    if locator_signature != _ZIP64_LOCATOR_SIGNATURE:
        return _plain_zip_end(size, disk_entries, entries16, cd_size32, cd_offset32)
    if locator_disk != 0 or disks != 1:
        raise _Invalid("not a torch archive: multi-disk zip")
    locator_offset = size - tail_length
    if zip64_offset + _ZIP64_EOCD.size > locator_offset:
        raise _Invalid(f"zip64 end record offset {zip64_offset} is out of range")

    record = _pread_exact(fd, _ZIP64_EOCD.size, zip64_offset, "zip64 end record")
    fields = _ZIP64_EOCD.unpack(record)
    signature, record_size, _made_by, _needed, disk, cd_disk = fields[:6]
    disk_entries64, entries, cd_size, cd_offset = fields[6:]
    if signature != _ZIP64_EOCD_SIGNATURE or zip64_offset + 12 + record_size != locator_offset:
        raise _Invalid("zip64 end-of-central-directory record is damaged")
    if disk != 0 or cd_disk != 0 or disk_entries64 != entries:
        raise _Invalid("not a torch archive: multi-disk zip")
    if cd_offset + cd_size != zip64_offset:
        raise _Invalid("central directory does not end where the zip64 end record starts")
    if entries16 not in (entries, _MAX16) or disk_entries not in (entries, _MAX16):
        raise _Invalid("end records disagree on the number of entries")
    if cd_size32 not in (cd_size, _MAX32) or cd_offset32 not in (cd_offset, _MAX32):
        raise _Invalid("end records disagree on the central directory position")
    return _ZipEnd(cd_offset, cd_size, entries)


def _plain_zip_end(
    size: int, disk_entries: int, entries: int, cd_size: int, cd_offset: int
) -> _ZipEnd:
    """Accept an archive without zip64 records when its end record alone is consistent.

    torch 2.13 always writes the zip64 records, but an archive from another writer or an older
    torch may lack them. The central directory must then end exactly where the end record starts.
    """
    if disk_entries != entries or _MAX32 in (cd_size, cd_offset) or entries == _MAX16:
        raise _Invalid("not a torch archive: zip64 end-of-central-directory locator missing")
    if cd_offset + cd_size != size - _EOCD.size:
        raise _Invalid("central directory does not end where the end-of-central-directory starts")
    return _ZipEnd(cd_offset, cd_size, entries)


def _zip64_values(extra: bytes, wanted: int, name: str) -> list[int]:
    """Return the first `wanted` 8-byte values of the zip64 extra field in `extra`."""
    position = 0
    while position + 4 <= len(extra):
        header_id, length = struct.unpack_from("<HH", extra, position)
        body = extra[position + 4 : position + 4 + length]
        if header_id == _ZIP64_EXTRA_ID and len(body) >= 8 * wanted:
            return list(struct.unpack_from(f"<{wanted}Q", body))
        position += 4 + length
    raise _Invalid(f"record {name} lacks the zip64 extra field its sizes need")


def _parse_central_header(directory: bytes, position: int) -> tuple[_ZipRecord, int]:
    """Parse the central directory header at `position`; return it and the next position."""
    if position + _CENTRAL_HEADER.size > len(directory):
        raise _Invalid("central directory ends inside a header")
    fields = _CENTRAL_HEADER.unpack_from(directory, position)
    signature, _made_by, _needed, flags, method, _time, _date, crc = fields[:8]
    compressed_size, uncompressed_size, name_length, extra_length, comment_length = fields[8:13]
    header_offset = fields[16]
    if signature != _CENTRAL_HEADER_SIGNATURE:
        raise _Invalid(f"central directory header at offset {position} has a bad signature")
    name_start = position + _CENTRAL_HEADER.size
    extra_start = name_start + name_length
    end = extra_start + extra_length + comment_length
    if end > len(directory):
        raise _Invalid("central directory ends inside a header")
    raw_name = directory[name_start:extra_start]
    name = raw_name.decode("utf-8", "surrogateescape")

    # Sizes and offset that do not fit in 32 bits are in the zip64 extra field, in this order.
    large = [uncompressed_size == _MAX32, compressed_size == _MAX32, header_offset == _MAX32]
    if any(large):
        extra = directory[extra_start : extra_start + extra_length]
        values = iter(_zip64_values(extra, sum(large), name))
        if large[0]:
            uncompressed_size = next(values)
        if large[1]:
            compressed_size = next(values)
        if large[2]:
            header_offset = next(values)
    record = _ZipRecord(
        name, raw_name, flags, method, crc, compressed_size, uncompressed_size, header_offset
    )
    return record, end


def _read_central_directory(fd: int, end: _ZipEnd) -> list[_ZipRecord]:
    if end.entries > end.cd_size // _CENTRAL_HEADER.size:
        raise _Invalid(
            f"central directory of {end.cd_size} bytes cannot hold {end.entries} entries"
        )
    if end.cd_size > MAX_PICKLE_BYTES:
        raise _Invalid(f"central directory of {end.cd_size} bytes is over the limit of this check")
    directory = _pread_exact(fd, end.cd_size, end.cd_offset, "central directory")
    records = []
    position = 0
    for _ in range(end.entries):
        record, position = _parse_central_header(directory, position)
        records.append(record)
    if position != end.cd_size:
        raise _Invalid("central directory has bytes after its last entry")
    return records


def _check_local_headers(fd: int, records: list[_ZipRecord], cd_offset: int) -> None:
    """Check each record's local header and that records lie, without overlap, before the CD."""
    ordered = sorted(records, key=lambda record: record.header_offset)
    limits = [record.header_offset for record in ordered[1:]] + [cd_offset]
    for record, limit in zip(ordered, limits):
        if record.flags & 0x1:
            raise _Invalid(f"record {record.name} is encrypted")
        length = _LOCAL_HEADER.size + len(record.raw_name)
        header = _pread_exact(fd, length, record.header_offset, f"local header of {record.name}")
        fields = _LOCAL_HEADER.unpack_from(header)
        signature, name_length, extra_length = fields[0], fields[9], fields[10]
        if signature != _LOCAL_HEADER_SIGNATURE:
            raise _Invalid(f"local header of {record.name} has a bad signature")
        if header[_LOCAL_HEADER.size :] != record.raw_name or name_length != len(record.raw_name):
            raise _Invalid(f"local header of {record.name} names another record")
        record.data_offset = record.header_offset + length + extra_length
        if record.data_offset + record.compressed_size > limit:
            raise _Invalid(f"record {record.name} overlaps the next record or the directory")


def _read_stored_record(fd: int, record: _ZipRecord) -> bytes:
    """Read one uncompressed record, as torch.save writes them, and check its CRC-32."""
    if record.method != 0:
        raise _Invalid(
            f"{record.name} is compressed with method {record.method}, "
            "but torch.save stores records uncompressed"
        )
    if record.compressed_size != record.uncompressed_size:
        raise _Invalid(f"directory entry of {record.name} has inconsistent sizes")
    if record.uncompressed_size > MAX_PICKLE_BYTES:
        raise _Invalid(
            f"{record.name} is {record.uncompressed_size} bytes, over the "
            f"{MAX_PICKLE_BYTES}-byte limit of this check"
        )
    data = _pread_exact(fd, record.compressed_size, record.data_offset, record.name)
    # Under torch.serialization.set_crc32_options(False), torch 2.13 writes CRC 0 for every
    # record and torch.load accepts the file, so 0 means that no CRC was recorded.
    if record.crc != 0 and zlib.crc32(data) != record.crc:
        raise _Invalid(f"CRC-32 mismatch in {record.name}")
    return data


def _archive_prefix(records: list[_ZipRecord]) -> str:
    """Return the folder all records sit in; torch's reader takes it from the first record."""
    if not records:
        raise _Invalid("not a torch archive: zip has no records")
    prefix, slash, _rest = records[0].name.partition("/")
    if not slash:
        raise _Invalid(f"not a torch archive: first record {records[0].name!r} is not in a folder")
    return prefix


def _check_storage_records(
    storages: dict[str, _StorageRef], by_name: dict[str, _ZipRecord], prefix: str
) -> None:
    for ref in storages.values():
        record = by_name.get(f"{prefix}/data/{ref.key}")
        if record is None:
            raise _Invalid(f"storage data/{ref.key} named in data.pkl has no record")
        element_size = STORAGE_ELEMENT_SIZES.get(ref.type_name)
        if element_size is None:
            continue
        # torch 2.13 writes exactly numel * element size bytes. Its loader raises on a record
        # of any other size, longer ones included, unless it loads with mmap=True.
        expected = ref.numel * element_size
        if record.uncompressed_size != expected:
            raise _Invalid(
                f"storage data/{ref.key} has {record.uncompressed_size} bytes, "
                f"data.pkl expects {expected} ({ref.numel} x {ref.type_name})"
            )


def _check_zip(fd: int, size: int) -> str:
    end = _read_zip_end(fd, size)
    records = _read_central_directory(fd, end)
    by_name: dict[str, _ZipRecord] = {}
    for record in records:
        if record.name in by_name:
            raise _Invalid(f"duplicate record {record.name}")
        by_name[record.name] = record
    prefix = _archive_prefix(records)
    pickle_record = by_name.get(f"{prefix}/data.pkl")
    if pickle_record is None:
        raise _Invalid(f"not a torch archive: no {prefix}/data.pkl record")
    if f"{prefix}/version" not in by_name and f"{prefix}/.data/version" not in by_name:
        raise _Invalid(f"not a torch archive: no {prefix}/version record")

    _check_local_headers(fd, records, end.cd_offset)
    data = _read_stored_record(fd, pickle_record)
    storages: dict[str, _StorageRef] = {}
    _unpickle(io.BytesIO(data), storages, legacy=False, what="data.pkl")
    _check_storage_records(storages, by_name, prefix)
    return f"complete zip archive, {_count(len(storages), 'storage')}"


# ---------------------------------------------------------------------------
# Legacy format


class _PreadReader:
    """Minimal binary file for the unpickler, reading with pread from its own position.

    It never moves the descriptor's offset. Reads past MAX_PICKLE_BYTES raise _Invalid, and
    `reached_eof` records a read cut short by the end of the file.
    """

    _CHUNK = 64 * 1024

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size
        self._buffer = b""
        self._buffer_start = 0
        self.position = 0
        self.reached_eof = False

    def _slice(self, start: int, end: int) -> bytes:
        buffer_end = self._buffer_start + len(self._buffer)
        if not (self._buffer_start <= start and end <= buffer_end):
            self._buffer = os.pread(self._fd, max(end - start, self._CHUNK), start)
            self._buffer_start = start
        return self._buffer[start - self._buffer_start : end - self._buffer_start]

    def _bounded_end(self, length: int) -> int:
        end = self.position + length
        if end > MAX_PICKLE_BYTES:
            raise _Invalid(f"legacy pickles run past the {MAX_PICKLE_BYTES}-byte limit")
        if end > self._size:
            self.reached_eof = True
            end = self._size
        return end

    def read(self, length: int = -1) -> bytes:
        if length < 0:
            length = self._size - self.position
        end = self._bounded_end(length)
        data = self._slice(self.position, end)
        if len(data) < end - self.position:
            self.reached_eof = True
        self.position += len(data)
        return data

    def readline(self) -> bytes:
        parts = []
        while True:
            available = self._size - self.position
            if available <= 0:
                self.reached_eof = True
                return b"".join(parts)
            chunk = self.read(min(1024, available))
            newline = chunk.find(b"\n")
            if newline >= 0:
                parts.append(chunk[: newline + 1])
                self.position -= len(chunk) - newline - 1
                return b"".join(parts)
            parts.append(chunk)


def _load_legacy_pickle(reader: _PreadReader, storages: dict[str, _StorageRef], what: str):
    try:
        return _unpickle(reader, storages, legacy=True, what=what)
    except _Invalid:
        if reader.reached_eof:
            raise _Invalid(f"truncated: {what} runs past the end of the file") from None
        raise


def _check_legacy_storages(
    fd: int, size: int, start: int, keys: list[str], storages: dict[str, _StorageRef]
) -> None:
    """Check each storage's element count header and that the last storage ends the file.

    torch.save writes nothing after the last storage, so trailing bytes make the file invalid
    because they come from another writer or from damage.
    """
    position = start
    for key in keys:
        ref = storages[key]
        element_size = STORAGE_ELEMENT_SIZES.get(ref.type_name)
        if element_size is None:
            raise _Invalid(
                f"storage {key} has unknown type {ref.type_name!r}, so its end cannot be found"
            )
        header = _pread_exact(fd, 8, position, f"size header of storage {key}")
        (count,) = struct.unpack("<q", header)
        if count != ref.numel:
            raise _Invalid(
                f"storage {key} has a size header of {count} elements, "
                f"but the pickle expects {ref.numel}"
            )
        position += 8 + count * element_size
        if position > size:
            raise _Invalid(f"truncated: storage {key} ends at byte {position}, file has {size}")
    if position != size:
        raise _Invalid(f"{size - position} unexpected bytes after the last storage")


def _check_legacy(fd: int, size: int) -> str:
    reader = _PreadReader(fd, size)
    unused: dict[str, _StorageRef] = {}
    try:
        magic = _unpickle(reader, unused, legacy=True, what="magic number")
    except _Invalid:
        if reader.reached_eof:
            raise _Invalid("truncated: magic number runs past the end of the file") from None
        magic = None
    if type(magic) is not int or magic != _LEGACY_MAGIC_NUMBER:
        raise _Invalid("not a torch checkpoint: legacy magic number missing")
    version = _load_legacy_pickle(reader, unused, "protocol version")
    if version != _LEGACY_PROTOCOL_VERSION:
        raise _Invalid(f"unsupported legacy protocol version {version!r}")
    _load_legacy_pickle(reader, unused, "system info")
    storages: dict[str, _StorageRef] = {}
    _load_legacy_pickle(reader, storages, "object pickle")
    keys = _load_legacy_pickle(reader, unused, "storage key list")
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise _Invalid("legacy storage key list is not a list of strings")
    if len(set(keys)) != len(keys):
        raise _Invalid("legacy storage key list repeats a key")
    missing = sorted(set(storages) - set(keys))
    if missing:
        raise _Invalid(f"storage {missing[0]} named in the pickle is not in the key list")
    extra = sorted(set(keys) - set(storages))
    if extra:
        raise _Invalid(f"storage {extra[0]} in the key list is not named in the pickle")
    _check_legacy_storages(fd, size, reader.position, keys, storages)
    return f"complete legacy file, {_count(len(keys), 'storage')}"


# ---------------------------------------------------------------------------
# Public interface


def _file_type_name(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISLNK, "symbolic link"),
    ]
    for test, name in kinds:
        if test(mode):
            return name
    return f"file of mode {stat.S_IFMT(mode):o}"


def _check_contents(fd: int, size: int) -> str:
    """Return the reason a non-empty regular file is valid, or raise _Invalid."""
    head = os.pread(fd, 4, 0)
    if head == _ZIP_LOCAL_MAGIC:
        return _check_zip(fd, size)
    if head == _LEGACY_PREFIX or (len(head) == 4 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return _check_legacy(fd, size)
    if len(head) < 4 and (_ZIP_LOCAL_MAGIC.startswith(head) or _LEGACY_PREFIX.startswith(head)):
        raise _Invalid(f"truncated: {len(head)} bytes")
    raise _Invalid("not a torch checkpoint: no zip or legacy torch signature")


def check_fd(fd: int) -> Verdict:
    """Check the regular file open as `fd`, reading with os.pread only.

    The descriptor's offset is not moved and the descriptor is not closed. OSError while
    reading gives an invalid verdict with reason ``unreadable: <strerror>``.
    """
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Verdict(False, f"not a regular file: {_file_type_name(st.st_mode)}")
        if st.st_size == 0:
            return Verdict(False, "empty file")
        return Verdict(True, _check_contents(fd, st.st_size))
    except _Invalid as invalid:
        return Verdict(False, invalid.reason)
    except OSError as exc:
        return Verdict(False, f"unreadable: {exc.strerror}")


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """Return the identity of a file version: device, inode, size, mtime and ctime in ns."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _open_and_check(dir_fd: int | None, name: str) -> tuple[Verdict, tuple | None]:
    """Check `name` and return the verdict with the file's stat_key.

    The key is None when the file could not be opened or changed while it was checked.
    """
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        reason = f"unreadable: {exc.strerror}"
        if exc.errno == errno.ELOOP:
            reason += " (symbolic links are not followed)"
        return Verdict(False, reason), None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return Verdict(False, f"not a regular file: {_file_type_name(before.st_mode)}"), None
        verdict = check_fd(fd)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    key = stat_key(before)
    return verdict, key if key == stat_key(after) else None


def check_file(dir_fd: int | None, name: str) -> Verdict:
    """Open `name` relative to folder `dir_fd` (None: the working directory) and check it.

    The open uses O_NOFOLLOW, so a symbolic link as the last path component is rejected, and
    O_NONBLOCK, so a FIFO does not block. Anything but a regular file is invalid.
    """
    verdict, _key = _open_and_check(dir_fd, name)
    return verdict


class ValidityCache:
    """Verdicts keyed by stat_key(), so that an unchanged file is read only once.

    A verdict is stored only when the file's stat_key() matches the caller's `st` both before
    and after the check, and when the file's last change is at least `settle_seconds` old.
    The age rule exists because a file rewritten within one timestamp tick, at the same size,
    would keep its key.
    Entries stay until forget_missing() drops them; past `max_entries` the least recently
    used entry goes. The methods may be called from several threads.
    """

    def __init__(self, max_entries: int = 65536, settle_seconds: float = 1.0) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._max_entries = max_entries
        self._settle_ns = int(settle_seconds * 1e9)
        self._verdicts: OrderedDict[tuple, Verdict] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._verdicts)

    def check(self, dir_fd: int | None, name: str, st: os.stat_result) -> Verdict:
        """Return the cached verdict for `st`, or check `name` and cache the result."""
        key = stat_key(st)
        with self._lock:
            cached = self._verdicts.get(key)
            if cached is not None:
                self._verdicts.move_to_end(key)
                return cached
        verdict, checked_key = _open_and_check(dir_fd, name)
        if checked_key != key:
            if checked_key is not None:
                _log.debug("not caching the verdict for %s: the file differs from its stat", name)
            return verdict
        last_change_ns = max(st.st_mtime_ns, st.st_ctime_ns)
        if time.time_ns() - last_change_ns < self._settle_ns:
            return verdict
        with self._lock:
            self._verdicts[key] = verdict
            if len(self._verdicts) > self._max_entries:
                self._verdicts.popitem(last=False)
        return verdict

    def forget_missing(self, live_keys: set) -> int:
        """Drop the entries whose key is not in `live_keys` and return the number dropped.

        Pass the stat_key() of every file still present, for example after each folder scan.
        """
        with self._lock:
            gone = [key for key in self._verdicts if key not in live_keys]
            for key in gone:
                del self._verdicts[key]
        return len(gone)
