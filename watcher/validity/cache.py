"""Remember verdicts per file version, so an unchanged file is read only once."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict

from watcher.validity._common import Verdict
from watcher.validity.checks import open_and_check, stat_key

_log = logging.getLogger(__name__)


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
        verdict, checked_key = open_and_check(dir_fd, name)
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
