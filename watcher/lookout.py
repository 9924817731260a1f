"""Wait for a missing checkpoint folder without polling it many times a second.

While the folder is missing, an inotify watch on its nearest existing parent folder wakes the
daemon when the name it needs next appears there: the folder itself, or the first missing folder
on the way to it. The daemon then tries the folder again, and moves the watch one level down when
only an intermediate folder appeared.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from watcher.mounts import network_filesystem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spot:
    """The nearest existing folder above a missing folder, and the name expected in it."""

    parent: str
    """Real path of the nearest existing folder above the missing one."""
    name: str
    """Name inside `parent` on the way to the missing folder."""


def spot_for(path: str) -> Spot | None:
    """Return the nearest existing folder above `path` and the next name below it, or None.

    Symbolic links in `path` are resolved as far as they lead, so a link whose target is missing
    is waited for at the target's parent. Return None for the root folder, which has no parent.
    """
    child = os.path.realpath(path)
    parent = os.path.dirname(child)
    while parent != child:
        if os.path.isdir(parent):
            return Spot(parent, os.path.basename(child))
        child, parent = parent, os.path.dirname(parent)
    return None


class _Handler(FileSystemEventHandler):
    """Call `wake` for an event on the expected name, or on the parent folder itself."""

    def __init__(self, spot: Spot, wake: Callable[[], None]) -> None:
        self._spot = spot
        self._wake = wake

    def dispatch(self, event: FileSystemEvent) -> None:
        for path in (event.src_path, event.dest_path):
            if not path:
                continue
            if path == self._spot.parent or os.path.split(path) == (
                self._spot.parent,
                self._spot.name,
            ):
                self._wake()
                return


class Lookout:
    """An inotify watch on the parent of a missing folder, moved as the path fills in."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._observer: BaseObserver | None = None
        self._spot: Spot | None = None

    @property
    def active(self) -> bool:
        """Whether a watch is set and its threads run, so that a change wakes the daemon."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        return all(emitter.is_alive() for emitter in list(observer.emitters))

    def follow(self, path: str) -> bool:
        """Watch the nearest existing parent of `path`, moving the watch if that parent changed.

        Return True when a new watch was set: the folder may have appeared just before it, so the
        caller looks again at once. Without a usable inotify watch (a shared filesystem, inotify
        limits, no readable parent) nothing is watched, and the caller polls instead.
        """
        spot = spot_for(path)
        if spot == self._spot and self.active:
            return False
        self.stop()
        if spot is None:
            return False
        fstype = network_filesystem(spot.parent)
        if fstype is not None:
            log.debug("%s is on a %s filesystem: polling for %s", spot.parent, fstype, path)
            return False
        observer = Observer()
        try:
            observer.schedule(_Handler(spot, self._wake), spot.parent, recursive=False)
            observer.start()
        except OSError as error:
            stop_observer(observer)
            level = (
                logging.WARNING if error.errno in (errno.ENOSPC, errno.EMFILE) else logging.DEBUG
            )
            log.log(
                level, "failed to watch %s for %s (%s): polling instead", spot.parent, path, error
            )
            return False
        self._observer = observer
        self._spot = spot
        log.debug("waiting for %r to appear in %s", spot.name, spot.parent)
        return True

    def stop(self) -> None:
        observer, self._observer, self._spot = self._observer, None, None
        if observer is not None:
            stop_observer(observer)


def stop_observer(observer: BaseObserver) -> None:
    """Stop a watchdog observer and wait up to 5 s for its threads, logging any failure."""
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    except Exception:
        log.exception("failed to stop the observer cleanly")
