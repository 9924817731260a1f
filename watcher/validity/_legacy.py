"""Check the legacy torch.save format: a sequence of pickles, then raw storage bytes."""

from __future__ import annotations

import os
import struct

from watcher.validity._common import (
    LEGACY_MAGIC_NUMBER,
    LEGACY_PROTOCOL_VERSION,
    MAX_PICKLE_BYTES,
    STORAGE_ELEMENT_SIZES,
    FileReader,
    Invalid,
    count_noun,
)
from watcher.validity._unpickle import StorageRef, unpickle_restricted


class _PreadReader:
    """Minimal binary file for the unpickler, reading with pread from its own position.

    It never moves the descriptor's offset. Reads past MAX_PICKLE_BYTES raise Invalid, and
    `reached_eof` records a read cut short by the end of the file. It starts with the window
    that `file` has loaded, which contains all of a small file.
    """

    _CHUNK = 64 * 1024

    def __init__(self, file: FileReader, size: int) -> None:
        self._fd = file.fd
        self._size = size
        self._buffer = file.window
        self._buffer_start = file.window_start
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
            raise Invalid(f"legacy pickles run past the {MAX_PICKLE_BYTES}-byte limit")
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


def _load_legacy_pickle(reader: _PreadReader, storages: dict[str, StorageRef], what: str):
    try:
        return unpickle_restricted(reader, storages, legacy=True, what=what)
    except Invalid:
        if reader.reached_eof:
            raise Invalid(f"truncated: {what} runs past the end of the file") from None
        raise


def _check_legacy_storages(
    file: FileReader, size: int, start: int, keys: list[str], storages: dict[str, StorageRef]
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
            raise Invalid(
                f"storage {key} has unknown type {ref.type_name!r}, so its end cannot be found"
            )
        if ref.type_name == "UntypedStorage":
            # torch 2.13's legacy loader reads the storage class's dtype, which UntypedStorage
            # lacks, so it cannot load the file. It writes such storages for dtypes without a
            # storage class of their own (uint16, float8 and others).
            raise Invalid(
                f"storage {key} is an UntypedStorage, which torch cannot load from a legacy file"
            )
        header = file.read_exact(8, position, f"size header of storage {key}")
        (count,) = struct.unpack("<q", header)
        if count != ref.numel:
            raise Invalid(
                f"storage {key} has a size header of {count} elements, "
                f"but the pickle expects {ref.numel}"
            )
        position += 8 + count * element_size
        if position > size:
            raise Invalid(f"truncated: storage {key} ends at byte {position}, file has {size}")
    if position != size:
        raise Invalid(f"{size - position} unexpected bytes after the last storage")


# NOTE: the legacy format has no checksums, and this check does not evaluate the tensor calls in
# its pickles. A damaged byte that still parses (a storage offset past the storage's end, a
# misspelled class name) makes torch.load fail on a file this check calls valid.
def check_legacy(file: FileReader, size: int) -> str:
    reader = _PreadReader(file, size)
    unused: dict[str, StorageRef] = {}
    try:
        magic = unpickle_restricted(reader, unused, legacy=True, what="magic number")
    except Invalid:
        if reader.reached_eof:
            raise Invalid("truncated: magic number runs past the end of the file") from None
        magic = None
    if type(magic) is not int or magic != LEGACY_MAGIC_NUMBER:
        raise Invalid("not a torch checkpoint: legacy magic number missing")
    version = _load_legacy_pickle(reader, unused, "protocol version")
    if version != LEGACY_PROTOCOL_VERSION:
        raise Invalid(f"unsupported legacy protocol version {version!r}")
    _load_legacy_pickle(reader, unused, "system info")
    storages: dict[str, StorageRef] = {}
    _load_legacy_pickle(reader, storages, "object pickle")
    keys = _load_legacy_pickle(reader, unused, "storage key list")
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise Invalid("legacy storage key list is not a list of strings")
    if len(set(keys)) != len(keys):
        raise Invalid("legacy storage key list repeats a key")
    missing = sorted(set(storages) - set(keys))
    if missing:
        raise Invalid(f"storage {missing[0]} named in the pickle is not in the key list")
    extra = sorted(set(keys) - set(storages))
    if extra:
        raise Invalid(f"storage {extra[0]} in the key list is not named in the pickle")
    _check_legacy_storages(file, size, reader.position, keys, storages)
    return f"complete legacy file, {count_noun(len(keys), 'storage')}"
