"""Check the zip archive that torch.save writes by default."""

from __future__ import annotations

import operator
import struct
import zlib
from dataclasses import dataclass

from watcher.validity._common import (
    MAX_PICKLE_BYTES,
    STORAGE_ELEMENT_SIZES,
    TAIL_WINDOW_BYTES,
    FileReader,
    Invalid,
    count_noun,
    pread_exact,
)
from watcher.validity._fast_unpickle import load_storages
from watcher.validity._unpickle import StorageRef

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


@dataclass(slots=True)
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


_header_offset_of = operator.attrgetter("header_offset")


@dataclass(slots=True)
class _ZipEnd:
    """Offset, size and entry count of the central directory, read from the end records."""

    cd_offset: int
    cd_size: int
    entries: int


def _read_zip_end(file: FileReader, size: int) -> _ZipEnd:
    """Parse the zip64 end record, its locator and the end record, which torch writes last."""
    tail_length = _EOCD.size + _ZIP64_LOCATOR.size
    if size < tail_length:
        raise Invalid("truncated: end-of-central-directory record missing")
    tail = file.read_exact(tail_length, size - tail_length, "end records")
    eocd = _EOCD.unpack_from(tail, _ZIP64_LOCATOR.size)
    signature, disk, cd_disk, disk_entries, entries16, cd_size32, cd_offset32, comment = eocd
    if signature != _EOCD_SIGNATURE:
        raise Invalid("truncated: end-of-central-directory record missing")
    if comment != 0 or disk not in (0, _MAX16) or cd_disk not in (0, _MAX16):
        raise Invalid("end-of-central-directory record is damaged or not from torch.save")

    locator_signature, locator_disk, zip64_offset, disks = _ZIP64_LOCATOR.unpack_from(tail)
    if locator_signature != _ZIP64_LOCATOR_SIGNATURE:
        return _plain_zip_end(size, disk_entries, entries16, cd_size32, cd_offset32)
    if locator_disk != 0 or disks != 1:
        raise Invalid("not a torch archive: multi-disk zip")
    locator_offset = size - tail_length
    if zip64_offset + _ZIP64_EOCD.size > locator_offset:
        raise Invalid(f"zip64 end record offset {zip64_offset} is out of range")

    record = file.read_exact(_ZIP64_EOCD.size, zip64_offset, "zip64 end record")
    fields = _ZIP64_EOCD.unpack(record)
    signature, record_size, _made_by, _needed, disk, cd_disk = fields[:6]
    disk_entries64, entries, cd_size, cd_offset = fields[6:]
    if signature != _ZIP64_EOCD_SIGNATURE or zip64_offset + 12 + record_size != locator_offset:
        raise Invalid("zip64 end-of-central-directory record is damaged")
    if disk != 0 or cd_disk != 0 or disk_entries64 != entries:
        raise Invalid("not a torch archive: multi-disk zip")
    if cd_offset + cd_size != zip64_offset:
        raise Invalid("central directory does not end where the zip64 end record starts")
    if entries16 not in (entries, _MAX16) or disk_entries not in (entries, _MAX16):
        raise Invalid("end records disagree on the number of entries")
    if cd_size32 not in (cd_size, _MAX32) or cd_offset32 not in (cd_offset, _MAX32):
        raise Invalid("end records disagree on the central directory position")
    return _ZipEnd(cd_offset, cd_size, entries)


def _plain_zip_end(
    size: int, disk_entries: int, entries: int, cd_size: int, cd_offset: int
) -> _ZipEnd:
    """Accept an archive without zip64 records when its end record alone is consistent.

    torch 2.13 always writes the zip64 records, but an archive from another writer or an older
    torch may lack them. The central directory must then end exactly where the end record starts.
    """
    if disk_entries != entries or _MAX32 in (cd_size, cd_offset) or entries == _MAX16:
        raise Invalid("not a torch archive: zip64 end-of-central-directory locator missing")
    if cd_offset + cd_size != size - _EOCD.size:
        raise Invalid("central directory does not end where the end-of-central-directory starts")
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
    raise Invalid(f"record {name} lacks the zip64 extra field its sizes need")


def _resolve_zip64(
    extra: bytes, uncompressed_size: int, compressed_size: int, header_offset: int, name: str
) -> tuple[int, int, int]:
    """Replace each 32-bit field at its maximum by its value from the zip64 extra field.

    The zip64 extra field lists the replaced values in this order: uncompressed size,
    compressed size, header offset.
    """
    large = [uncompressed_size == _MAX32, compressed_size == _MAX32, header_offset == _MAX32]
    values = iter(_zip64_values(extra, sum(large), name))
    if large[0]:
        uncompressed_size = next(values)
    if large[1]:
        compressed_size = next(values)
    if large[2]:
        header_offset = next(values)
    return uncompressed_size, compressed_size, header_offset


def _parse_central_directory(directory: bytes, entries: int) -> list[_ZipRecord]:
    """Parse `entries` central directory headers, which must fill `directory` exactly."""
    records = []
    position = 0
    for _ in range(entries):
        if position + _CENTRAL_HEADER.size > len(directory):
            raise Invalid("central directory ends inside a header")
        (
            signature,
            _made_by,
            _needed,
            flags,
            method,
            _time,
            _date,
            crc,
            compressed_size,
            uncompressed_size,
            name_length,
            extra_length,
            comment_length,
            _disk,
            _internal_attributes,
            _external_attributes,
            header_offset,
        ) = _CENTRAL_HEADER.unpack_from(directory, position)
        if signature != _CENTRAL_HEADER_SIGNATURE:
            raise Invalid(f"central directory header at offset {position} has a bad signature")
        name_start = position + _CENTRAL_HEADER.size
        extra_start = name_start + name_length
        position = extra_start + extra_length + comment_length
        if position > len(directory):
            raise Invalid("central directory ends inside a header")
        raw_name = directory[name_start:extra_start]
        name = raw_name.decode("utf-8", "surrogateescape")
        if _MAX32 in (uncompressed_size, compressed_size, header_offset):
            extra = directory[extra_start : extra_start + extra_length]
            uncompressed_size, compressed_size, header_offset = _resolve_zip64(
                extra, uncompressed_size, compressed_size, header_offset, name
            )
        records.append(
            _ZipRecord(
                name,
                raw_name,
                flags,
                method,
                crc,
                compressed_size,
                uncompressed_size,
                header_offset,
            )
        )
    if position != len(directory):
        raise Invalid("central directory has bytes after its last entry")
    return records


def _read_central_directory(file: FileReader, end: _ZipEnd) -> list[_ZipRecord]:
    if end.entries > end.cd_size // _CENTRAL_HEADER.size:
        raise Invalid(f"central directory of {end.cd_size} bytes cannot hold {end.entries} entries")
    if end.cd_size > MAX_PICKLE_BYTES:
        raise Invalid(f"central directory of {end.cd_size} bytes is over the limit of this check")
    directory = file.read_exact(end.cd_size, end.cd_offset, "central directory")
    return _parse_central_directory(directory, end.entries)


def _check_local_headers(file: FileReader, records: list[_ZipRecord], cd_offset: int) -> None:
    """Check each record's local header and that records lie, without overlap, before the CD."""
    ordered = sorted(records, key=_header_offset_of)
    limits = [record.header_offset for record in ordered[1:]]
    limits.append(cd_offset)
    window = file.window
    for record, limit in zip(ordered, limits):
        if record.flags & 0x1:
            raise Invalid(f"record {record.name} is encrypted")
        raw_name = record.raw_name
        length = _LOCAL_HEADER.size + len(raw_name)
        # A header inside the window is parsed in place, which saves a copy per record.
        start = record.header_offset - file.window_start
        if start >= 0 and start + length <= len(window):
            buffer = window
        else:
            what = f"local header of {record.name}"
            buffer = pread_exact(file.fd, length, record.header_offset, what)
            start = 0
        fields = _LOCAL_HEADER.unpack_from(buffer, start)
        signature, name_length, extra_length = fields[0], fields[9], fields[10]
        if signature != _LOCAL_HEADER_SIGNATURE:
            raise Invalid(f"local header of {record.name} has a bad signature")
        name_start = start + _LOCAL_HEADER.size
        if name_length != len(raw_name) or not buffer.startswith(raw_name, name_start):
            raise Invalid(f"local header of {record.name} names another record")
        record.data_offset = record.header_offset + length + extra_length
        if record.data_offset + record.compressed_size > limit:
            raise Invalid(f"record {record.name} overlaps the next record or the directory")


def _read_stored_record(file: FileReader, record: _ZipRecord) -> bytes:
    """Read one uncompressed record, as torch.save writes them, and check its CRC-32."""
    if record.method != 0:
        raise Invalid(
            f"{record.name} is compressed with method {record.method}, "
            "but torch.save stores records uncompressed"
        )
    if record.compressed_size != record.uncompressed_size:
        raise Invalid(f"directory entry of {record.name} has inconsistent sizes")
    if record.uncompressed_size > MAX_PICKLE_BYTES:
        raise Invalid(
            f"{record.name} is {record.uncompressed_size} bytes, over the "
            f"{MAX_PICKLE_BYTES}-byte limit of this check"
        )
    data = file.read_exact(record.compressed_size, record.data_offset, record.name)
    # Under torch.serialization.set_crc32_options(False), torch 2.13 writes CRC 0 for every
    # record and torch.load accepts the file, so 0 means that no CRC was recorded.
    if record.crc != 0 and zlib.crc32(data) != record.crc:
        raise Invalid(f"CRC-32 mismatch in {record.name}")
    return data


def _archive_prefix(records: list[_ZipRecord]) -> str:
    """Return the folder all records sit in; torch's reader takes it from the first record."""
    if not records:
        raise Invalid("not a torch archive: zip has no records")
    prefix, slash, _rest = records[0].name.partition("/")
    if not slash:
        raise Invalid(f"not a torch archive: first record {records[0].name!r} is not in a folder")
    return prefix


def _check_storage_records(
    storages: dict[str, StorageRef], by_name: dict[str, _ZipRecord], prefix: str
) -> None:
    data_folder = f"{prefix}/data/"
    for ref in storages.values():
        record = by_name.get(data_folder + ref.key)
        if record is None:
            raise Invalid(f"storage data/{ref.key} named in data.pkl has no record")
        element_size = STORAGE_ELEMENT_SIZES.get(ref.type_name)
        if element_size is None:
            continue
        # torch 2.13 writes exactly numel * element size bytes. Its loader raises on a record
        # of any other size, longer ones included, unless it loads with mmap=True.
        expected = ref.numel * element_size
        if record.uncompressed_size != expected:
            raise Invalid(
                f"storage data/{ref.key} has {record.uncompressed_size} bytes, "
                f"data.pkl expects {expected} ({ref.numel} x {ref.type_name})"
            )


def check_zip(file: FileReader, size: int) -> str:
    if size > TAIL_WINDOW_BYTES:
        # A smaller file is already in the window whole.
        file.load_tail(size)
    end = _read_zip_end(file, size)
    records = _read_central_directory(file, end)
    by_name: dict[str, _ZipRecord] = {}
    for record in records:
        if record.name in by_name:
            raise Invalid(f"duplicate record {record.name}")
        by_name[record.name] = record
    prefix = _archive_prefix(records)
    pickle_record = by_name.get(f"{prefix}/data.pkl")
    if pickle_record is None:
        raise Invalid(f"not a torch archive: no {prefix}/data.pkl record")
    if f"{prefix}/version" not in by_name and f"{prefix}/.data/version" not in by_name:
        raise Invalid(f"not a torch archive: no {prefix}/version record")

    _check_local_headers(file, records, end.cd_offset)
    data = _read_stored_record(file, pickle_record)
    storages = load_storages(data, "data.pkl")
    _check_storage_records(storages, by_name, prefix)
    return f"complete zip archive, {count_noun(len(storages), 'storage')}"
