"""Shared pieces of the validity check: the verdict, the failure exception and exact reads."""

from __future__ import annotations

import os
from dataclasses import dataclass

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

ZIP_LOCAL_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
# PROTO 2, LONG1 of 10 bytes: how every legacy file written with the default protocol starts.
LEGACY_PREFIX = b"\x80\x02\x8a\x0a"


@dataclass(frozen=True)
class Verdict:
    """Outcome of a check: whether the file is a complete checkpoint, and a short reason."""

    valid: bool
    reason: str


class Invalid(Exception):
    """Raised inside the check with the reason the file is not a complete checkpoint."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def count_noun(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


# Largest file offset Linux accepts (off_t is signed 64-bit). An offset read from a damaged
# or crafted file can be larger, and os.pread would raise OverflowError for it.
_MAX_OFFSET = 2**63 - 1

# Size of the window that one pread takes from the end of a zip archive. It contains the end
# records and central directory of a torch checkpoint with several hundred records, and all of
# a file up to this size.
TAIL_WINDOW_BYTES = 64 * 1024


def pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    if offset + length > _MAX_OFFSET:
        raise Invalid(f"truncated: {what} at byte {offset} runs past the end of the file")
    chunks = []
    remaining = length
    while remaining > 0:
        chunk = os.pread(fd, remaining, offset + length - remaining)
        if not chunk:
            raise Invalid(f"truncated: {what} at byte {offset} runs past the end of the file")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class FileReader:
    """Positioned reads of one open file, served without a syscall inside a loaded window.

    The window is a copy of the bytes at [window_start, window_start + len(window)) taken by
    load_window, so a read inside it returns what os.pread returned then.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.window = b""
        self.window_start = 0

    def load_window(self, start: int, length: int) -> None:
        self.window = os.pread(self.fd, length, start)
        self.window_start = start

    def load_tail(self, size: int) -> None:
        """Load the last TAIL_WINDOW_BYTES of a file of `size` bytes, or all of a smaller one."""
        start = max(0, size - TAIL_WINDOW_BYTES)
        self.load_window(start, size - start)

    def read(self, length: int, offset: int) -> bytes:
        """Return up to `length` bytes at `offset`, fewer at the end of the file, like os.pread."""
        start = offset - self.window_start
        if start >= 0 and start + length <= len(self.window):
            return self.window[start : start + length]
        return os.pread(self.fd, length, offset)

    def read_exact(self, length: int, offset: int, what: str) -> bytes:
        """Return `length` bytes at `offset`, or raise Invalid naming `what` if the file ends."""
        start = offset - self.window_start
        if start >= 0 and start + length <= len(self.window):
            return self.window[start : start + length]
        return pread_exact(self.fd, length, offset, what)
