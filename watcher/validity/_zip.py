"""Check the zip archive that torch.save writes by default."""

from __future__ import annotations

import operator
import struct
import zlib
from collections.abc import Iterable

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
# The 46-byte central directory header, unpacked into the fields this check uses: signature,
# flags, method, CRC-32, compressed size, uncompressed size, name length, extra field length,
# comment length, disk number, external attributes and local header offset. Pad bytes (x) skip
# the others.
_CENTRAL_HEADER = struct.Struct("<I4xHH4xIIIHHHH2xII")
_CENTRAL_HEADER_SIZE = 46
_CENTRAL_HEADER_SIGNATURE = 0x02014B50
# The 30-byte local header, unpacked into signature, name length and extra field length.
_LOCAL_HEADER = struct.Struct("<I22xHH")
_LOCAL_HEADER_SIZE = 30
_LOCAL_HEADER_SIGNATURE = 0x04034B50
_ZIP64_EXTRA_ID = 0x0001
# Flags that make torch 2.13's zip reader (miniz) fail on a record, each tried with torch.load:
# encrypted (bit 0), compressed patch data (bit 5), strong encryption (bit 6) and a masked local
# header (bit 13).
_UNREADABLE_FLAGS = 0x0001 | 0x0020 | 0x0040 | 0x2000
# The MS-DOS directory attribute in a record's external attributes. torch's zip reader takes such a
# record for a directory and reads no data from it. It does the same with a name that ends with
# "/", but no name that torch.load reads ends with one.
_DOS_DIRECTORY_ATTRIBUTE = 0x10
_MAX16 = 0xFFFF
_MAX32 = 0xFFFFFFFF


# A central directory entry is kept as a plain tuple, which is cheaper to build than a class
# instance, with the fields (header offset, name, raw name bytes, flags, method, CRC-32,
# compressed size, uncompressed size). The name is the raw name decoded as UTF-8 with
# surrogateescape.
_header_offset_of = operator.itemgetter(0)
_UNCOMPRESSED_SIZE = 7


def _read_zip_end(file: FileReader, size: int) -> tuple[int, int, int]:
    """Parse the zip64 end record, its locator and the end record, which torch writes last.

    Return the offset, size and entry count of the central directory.
    """
    tail_length = _EOCD.size + _ZIP64_LOCATOR.size
    if size < tail_length:
        raise Invalid("truncated: end-of-central-directory record missing")
    tail = file.read_exact(tail_length, size - tail_length, "end records")
    eocd = _EOCD.unpack_from(tail, _ZIP64_LOCATOR.size)
    signature, disk, cd_disk, disk_entries, entries16, cd_size32, cd_offset32, comment = eocd
    if signature != _EOCD_SIGNATURE:
        _raise_for_bytes_after_end(file, size)
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
    return cd_offset, cd_size, entries


def _raise_for_bytes_after_end(file: FileReader, size: int) -> None:
    """Raise Invalid naming the bytes after an end record found earlier in the loaded window.

    torch.save writes nothing after the end record, so such bytes were added by something else.
    """
    signature = _EOCD_SIGNATURE.to_bytes(4, "little")
    found = file.window.rfind(signature)
    while found >= 0:
        end = file.window_start + found + _EOCD.size
        if end < size:
            extra = count_noun(size - end, "byte")
            raise Invalid(f"{extra} after the end-of-central-directory record")
        found = file.window.rfind(signature, 0, found)


def _plain_zip_end(
    size: int, disk_entries: int, entries: int, cd_size: int, cd_offset: int
) -> tuple[int, int, int]:
    """Accept an archive without zip64 records when its end record alone is consistent.

    torch 2.13 always writes the zip64 records, but an archive from another writer or an older
    torch may lack them. The central directory must then end exactly where the end record starts.
    """
    if disk_entries != entries or _MAX32 in (cd_size, cd_offset) or entries == _MAX16:
        raise Invalid("not a torch archive: zip64 end-of-central-directory locator missing")
    if cd_offset + cd_size != size - _EOCD.size:
        raise Invalid("central directory does not end where the end-of-central-directory starts")
    return cd_offset, cd_size, entries


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


def _parse_central_directory(directory: bytes, entries: int) -> dict[str, tuple]:
    """Parse `entries` central directory headers, which must fill `directory` exactly.

    Return the entry tuples by name, in directory order. Raise Invalid for a damaged
    directory or a name that occurs twice.
    """
    records: dict[str, tuple] = {}
    duplicate = None
    position = 0
    directory_size = len(directory)
    unpack_header = _CENTRAL_HEADER.unpack_from
    for _ in range(entries):
        if position + _CENTRAL_HEADER_SIZE > directory_size:
            raise Invalid("central directory ends inside a header")
        (
            signature,
            flags,
            method,
            crc,
            compressed_size,
            uncompressed_size,
            name_length,
            extra_length,
            comment_length,
            disk,
            external_attributes,
            header_offset,
        ) = unpack_header(directory, position)
        if signature != _CENTRAL_HEADER_SIGNATURE:
            raise Invalid(f"central directory header at offset {position} has a bad signature")
        name_start = position + _CENTRAL_HEADER_SIZE
        extra_start = name_start + name_length
        position = extra_start + extra_length + comment_length
        if position > directory_size:
            raise Invalid("central directory ends inside a header")
        raw_name = directory[name_start:extra_start]
        name = raw_name.decode("utf-8", "surrogateescape")
        if uncompressed_size == _MAX32 or compressed_size == _MAX32 or header_offset == _MAX32:
            extra = directory[extra_start : extra_start + extra_length]
            uncompressed_size, compressed_size, header_offset = _resolve_zip64(
                extra, uncompressed_size, compressed_size, header_offset, name
            )
        # What torch.save writes, and what torch's reader needs to read each record: one test
        # for the usual case, then the reason.
        if (
            method
            or compressed_size != uncompressed_size
            or flags & _UNREADABLE_FLAGS
            or disk
            or external_attributes & _DOS_DIRECTORY_ATTRIBUTE
        ):
            _reject_entry(name, method, compressed_size, uncompressed_size, flags, disk)
        if duplicate is None and name in records:
            duplicate = name
        records[name] = (
            header_offset,
            name,
            raw_name,
            flags,
            method,
            crc,
            compressed_size,
            uncompressed_size,
        )
    if position != directory_size:
        raise Invalid("central directory has bytes after its last entry")
    # A damaged entry later in the directory takes precedence over a repeated name.
    if duplicate is not None:
        raise Invalid(f"duplicate record {duplicate}")
    return records


def _reject_entry(
    name: str, method: int, compressed_size: int, uncompressed_size: int, flags: int, disk: int
) -> None:
    """Raise Invalid for a central directory entry that torch.save would not write."""
    if method != 0:
        raise Invalid(
            f"{name} is compressed with method {method}, but torch.save stores records uncompressed"
        )
    if compressed_size != uncompressed_size:
        raise Invalid(f"directory entry of {name} has inconsistent sizes")
    if flags & _UNREADABLE_FLAGS:
        raise Invalid(f"record {name} has flags {flags:#06x}, which mark it encrypted or masked")
    if disk != 0:
        raise Invalid(f"record {name} starts on disk {disk}: not a torch archive: multi-disk zip")
    raise Invalid(f"record {name} is marked as a directory, from which torch reads no data")


def _read_central_directory(
    file: FileReader, cd_offset: int, cd_size: int, entries: int
) -> dict[str, tuple]:
    if entries > cd_size // _CENTRAL_HEADER_SIZE:
        raise Invalid(f"central directory of {cd_size} bytes cannot hold {entries} entries")
    if cd_size > MAX_PICKLE_BYTES:
        raise Invalid(f"central directory of {cd_size} bytes is over the limit of this check")
    directory = file.read_exact(cd_size, cd_offset, "central directory")
    return _parse_central_directory(directory, entries)


def _check_local_headers(
    file: FileReader, records: Iterable[tuple], cd_offset: int, pickle_record: tuple, prefix: str
) -> int:
    """Check each record's local header and that records lie, without overlap, before the CD.

    Check the content of the small records that torch.load parses too, in the archive's folder
    `prefix`. Return where the data of `pickle_record`, one of `records`, starts.
    """
    ordered = sorted(records, key=_header_offset_of)
    limits = [record[0] for record in ordered[1:]]
    limits.append(cd_offset)
    window = file.window
    window_start = file.window_start
    window_size = len(window)
    pickle_data_offset = -1
    checks = _SMALL_RECORD_CHECKS
    name_start = len(prefix) + 1
    for record, limit in zip(ordered, limits):
        header_offset, name, raw_name, _flags, _method, _crc, compressed_size, _size = record
        length = _LOCAL_HEADER_SIZE + len(raw_name)
        # A header inside the window is parsed in place, which saves a copy per record.
        start = header_offset - window_start
        if start >= 0 and start + length <= window_size:
            buffer = window
        else:
            what = f"local header of {name}"
            buffer = pread_exact(file.fd, length, header_offset, what)
            start = 0
        signature, name_length, extra_length = _LOCAL_HEADER.unpack_from(buffer, start)
        if signature != _LOCAL_HEADER_SIGNATURE:
            raise Invalid(f"local header of {name} has a bad signature")
        if name_length != len(raw_name) or not buffer.startswith(
            raw_name, start + _LOCAL_HEADER_SIZE
        ):
            raise Invalid(f"local header of {name} names another record")
        data_offset = header_offset + length + extra_length
        if data_offset + compressed_size > limit:
            raise Invalid(f"record {name} overlaps the next record or the directory")
        if record is pickle_record:
            pickle_data_offset = data_offset
            continue
        check = checks.get(name[name_start:])
        if check is not None:
            _check_small_record(file, record, data_offset, check)
    return pickle_data_offset


def _check_small_record(file: FileReader, record: tuple, data_offset: int, check) -> None:
    name = record[1]
    length = record[_UNCOMPRESSED_SIZE]
    if length > _SMALL_RECORD_MAX:
        raise Invalid(
            f"{name} is {length} bytes, over the {_SMALL_RECORD_MAX}-byte limit of this check"
        )
    check(name, file.read_exact(length, data_offset, name))


def _read_stored_record(file: FileReader, record: tuple, data_offset: int) -> bytes:
    """Read one uncompressed record, as torch.save writes them, and check its CRC-32.

    _parse_central_directory has checked that the record is stored, with equal sizes.
    """
    _header_offset, name, _raw_name, _flags, _method, crc, _compressed_size, size = record
    if size > MAX_PICKLE_BYTES:
        raise Invalid(
            f"{name} is {size} bytes, over the {MAX_PICKLE_BYTES}-byte limit of this check"
        )
    data = file.read_exact(size, data_offset, name)
    # Under torch.serialization.set_crc32_options(False), torch 2.13 writes CRC 0 for every
    # record and torch.load accepts the file, so 0 means that no CRC was recorded.
    # NOTE: without a CRC, damage to data.pkl that still parses, such as a storage offset past
    # the storage's end, is not found: this check does not evaluate the tensor calls.
    if crc != 0 and zlib.crc32(data) != crc:
        raise Invalid(f"CRC-32 mismatch in {name}")
    return data


def _check_byteorder(name: str, content: bytes) -> None:
    if content != b"little" and content != b"big":
        raise Invalid(f"{name} is {content[:16]!r}, not b'little' or b'big'")


def _check_version(name: str, content: bytes) -> None:
    if len(content) <= 3 and content[:1].isdigit() and content[:1] != b"0":
        return  # What torch.save writes: a short version number and a line feed.
    # torch's reader parses the record with std::stoull: leading white space, an optional '+'
    # and the digits that follow, ignoring the rest.
    text = content.lstrip(b" \t\n\v\f\r").removeprefix(b"+")
    digits = text[: len(text) - len(text.lstrip(b"0123456789"))]
    # NOTE: torch 2.13 reads versions 1 to 10 only, but a newer torch may write higher ones,
    # so only the limit of std::stoull is kept.
    if not digits or not 1 <= int(digits) < 2**64:
        raise Invalid(f"{name} is {content[:16]!r}, not a file format version")


def _check_alignment(name: str, content: bytes) -> None:
    if content.isdigit():
        return  # What torch.save writes, which int() accepts.
    try:
        int(content)
    except ValueError:
        raise Invalid(f"{name} is {content[:16]!r}, not a number") from None


def _check_utf8(name: str, content: bytes) -> None:
    if content.isascii():
        return
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid(f"{name} is not UTF-8 text") from None


# The records besides data.pkl whose content can make torch.load fail, named without the
# archive's folder, with checks that parse them as torch 2.13 does. torch.load reads no other
# record outside the storage folder, and .format_version fails no parse. A damaged byte that
# still parses goes unnoticed, as it does in torch.load, which checks no CRC-32 when it reads.
_SMALL_RECORD_CHECKS = {
    "byteorder": _check_byteorder,
    "version": _check_version,
    ".data/version": _check_version,
    ".storage_alignment": _check_alignment,
    ".data/serialization_id": _check_utf8,
}
_SMALL_RECORD_MAX = 4096
"""Maximum length of such a record that this check reads. torch.save writes at most 40 bytes
into each."""


def _archive_prefix(records: dict[str, tuple]) -> str:
    """Return the folder all records sit in; torch's reader takes it from the first record."""
    if not records:
        raise Invalid("not a torch archive: zip has no records")
    first_name = next(iter(records))
    prefix, slash, _rest = first_name.partition("/")
    if not slash:
        raise Invalid(f"not a torch archive: first record {first_name!r} is not in a folder")
    return prefix


def _check_storage_records(
    storages: dict[str, StorageRef], records: dict[str, tuple], prefix: str
) -> None:
    data_folder = f"{prefix}/data/"
    for key, type_name, numel in storages.values():
        record = records.get(data_folder + key)
        if record is None:
            raise Invalid(f"storage data/{key} named in data.pkl has no record")
        element_size = STORAGE_ELEMENT_SIZES.get(type_name)
        if element_size is None:
            continue
        # torch 2.13 writes exactly numel * element size bytes. Its loader raises on a record
        # of any other size, longer ones included, unless it loads with mmap=True.
        expected = numel * element_size
        size = record[_UNCOMPRESSED_SIZE]
        if size != expected:
            raise Invalid(
                f"storage data/{key} has {size} bytes, "
                f"data.pkl expects {expected} ({numel} x {type_name})"
            )


def check_zip(file: FileReader, size: int) -> str:
    if size > TAIL_WINDOW_BYTES:
        # A smaller file is already in the window whole.
        file.load_tail(size)
    cd_offset, cd_size, entries = _read_zip_end(file, size)
    records = _read_central_directory(file, cd_offset, cd_size, entries)
    prefix = _archive_prefix(records)
    pickle_record = records.get(f"{prefix}/data.pkl")
    if pickle_record is None:
        raise Invalid(f"not a torch archive: no {prefix}/data.pkl record")
    if f"{prefix}/version" not in records and f"{prefix}/.data/version" not in records:
        raise Invalid(f"not a torch archive: no {prefix}/version record")

    data_offset = _check_local_headers(file, records.values(), cd_offset, pickle_record, prefix)
    data = _read_stored_record(file, pickle_record, data_offset)
    storages = load_storages(data, "data.pkl")
    _check_storage_records(storages, records, prefix)
    return f"complete zip archive, {count_noun(len(storages), 'storage')}"
