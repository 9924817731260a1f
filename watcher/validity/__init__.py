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

from watcher.validity._common import MAX_PICKLE_BYTES, STORAGE_ELEMENT_SIZES, Verdict
from watcher.validity.cache import ValidityCache
from watcher.validity.checks import check_fd, check_file, stat_key

__all__ = [
    "MAX_PICKLE_BYTES",
    "STORAGE_ELEMENT_SIZES",
    "ValidityCache",
    "Verdict",
    "check_fd",
    "check_file",
    "stat_key",
]
