"""The long-running watcher: when to run a pass, and everything that keeps it running for weeks.

The daemon owns no retention logic. The main thread runs every pass; the watchdog observer's
threads only set a flag and wake it. A pass runs at start, as soon as a relevant event arrives,
and at least every `rescan_interval` seconds, which catches events lost to a queue overflow or
made while the watcher was down. Events that arrive during a pass are coalesced into one more pass.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingEmitter

from watcher.config import ConfigError, Policy
from watcher.lock import LockError, acquire_lock
from watcher.lookout import Lookout, stop_observer
from watcher.mounts import network_filesystem
from watcher.notify import Notifier
from watcher.passes import FolderError, Pruner, open_folder
from watcher.policy import UnsafePlanError
from watcher.prune import PRUNING_PREFIX
from watcher.scan import LOCK_NAME

log = logging.getLogger(__name__)

FOLDER_CHECK_INTERVAL = 10.0
"""Seconds between checks that the folder still exists and is the one being watched. Renaming the
watched folder, or pointing the symbolic link that names it at another folder, gives no event, so
only this check notices it. Each check wakes an idle daemon, and on the 2-core virtual machine of
the benchmarks a wake-up cost from 0.4 to 10 ms of CPU, by the load of the host, even in a Python
loop that does nothing else. At one check a second that was up to 0.6 s of CPU a minute.
NOTE: an inotify watch on the folder's parent would report a rename at once, but this check also
finds an observer whose threads died, which gives no event, so an idle daemon still wakes."""
WAIT_INTERVAL = 1.0
"""Seconds between checks for a missing folder when no inotify watch on its parent is possible
(a shared filesystem, --polling, inotify limits). With such a watch, its events wake the daemon,
and the folder is otherwise checked every FOLDER_CHECK_INTERVAL."""
POLL_INTERVAL = 1.0
"""Seconds between listings made by the polling observer."""
INVALID_REPORT_DELAY = 30.0
"""Seconds an invalid checkpoint must stay unchanged before it is logged as a warning: one that is
still being written changes all the time and is only logged at DEBUG."""
MODIFIED_PASS_INTERVAL = 1.0
"""Minimum seconds between passes caused only by writes into a file. A large in-place save sends
thousands of modified events, and its end is announced by a closed event anyway."""
LOCAL_SETTLE_SECONDS = 0.05
SHARED_SETTLE_SECONDS = 2.0
"""Minimum age of a file's last change before its verdict is cached. It must exceed one tick of the
filesystem's timestamps, because a rewrite within one tick at the same size keeps the file's stat.
Local Linux filesystems stamp with the kernel tick (1 to 10 ms); shared and FUSE filesystems may
be much coarser."""
MOVE_PAIRING_DELAY = 0.01
"""Seconds watchdog's inotify observer keeps the first half of a rename while it waits for the
second. Its default of 0.5 s also delays every event queued behind it, so deletions lag by up to
half a second. Both halves of a rename inside one folder arrive in the same read."""
INOTIFY_EVENTS = [
    FileCreatedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    FileClosedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]
"""Events asked of the inotify observer. watchdog turns the list into the kernel's event mask, so
writes, opens and closes without a write never reach the process: a save of a few megabytes sends
hundreds of writes, and every validity check opens a file. A checkpoint written in place is looked
at when its writer closes it, or sooner when a pass over its series looks at the newest files
again. The polling observer gets every event, since it reports no closes."""
MAX_OBSERVER_RESTARTS = 5
RESTART_WINDOW = 600.0
"""More than MAX_OBSERVER_RESTARTS within this many seconds ends the daemon with status 1, so the
service manager restarts it from scratch."""
FAULT_ENV = "CKPT_WATCHER_TEST_FAULT"
"""Set to 'handler' to make the event handler raise past its guard once. The tests use it to
prove that a dead observer thread is noticed and replaced."""

EXIT_OK = 0
EXIT_RUNTIME = 1


@dataclass
class _Watch:
    path: str
    """The folder as the policy names it, maybe through symbolic links."""
    observed: str
    """The folder's real path, without symbolic links, which the observer watches."""
    dir_fd: int
    lock_fd: int | None
    identity: tuple[int, int]
    observer: BaseObserver
    observer_kind: str


class _EventHandler(FileSystemEventHandler):
    """Wake the daemon for events that can change the retention decision."""

    fault_pending = os.environ.get(FAULT_ENV) == "handler"
    """Whether the next event kills the dispatch thread. The fault fires once per process, so
    that the observer started in place of the killed one works."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def dispatch(self, event: FileSystemEvent) -> None:
        if _EventHandler.fault_pending:
            _EventHandler.fault_pending = False
            raise RuntimeError(f"fault injected by {FAULT_ENV}")
        try:
            log.debug("event %s %s -> %s", event.event_type, event.src_path, event.dest_path)
            self._daemon.note_event(event)
        except Exception:
            # An exception escaping here would end the observer's dispatch thread silently.
            log.exception("failed to handle event %r; running a full pass instead", event)
            self._daemon.request_pass()


class _PollDoneEvent(FileSystemEvent):
    """Marker that follows the events of one poll of the polling observer."""

    event_type = "poll_done"


class _BatchedPollingEmitter(PollingEmitter):
    """Polling emitter that ends the events of each poll that found a change with a marker.

    One poll reports every file created since the last in an arbitrary order. Held back until
    the marker, they reach a pass together, so the newest of them by step counts as the latest
    arrival, and not whichever came first out of the poll.
    """

    _queued = 0

    def queue_events(self, timeout: float) -> None:
        self._queued = 0
        super().queue_events(timeout)
        if self._queued:
            super().queue_event(_PollDoneEvent(self.watch.path, is_synthetic=True))

    def queue_event(self, event: FileSystemEvent) -> None:
        self._queued += 1
        super().queue_event(event)


def _polling_observer() -> BaseObserver:
    return BaseObserver(_BatchedPollingEmitter, timeout=POLL_INTERVAL)


class _OverflowHandler(logging.Handler):
    """Turn watchdog's queue overflow warning into a full pass, since events were lost."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(logging.WARNING)
        self._daemon = daemon

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._daemon.request_pass()


class Daemon:
    def __init__(
        self,
        policy: Policy,
        load_policy: Callable[[], Policy],
        notifier: Notifier | None = None,
    ) -> None:
        self.policy = policy
        self._load_policy = load_policy
        self._notifier = notifier or Notifier()
        # A pass over a large folder can outlast WatchdogSec, so the pass pings while it works.
        self._pruner = Pruner(
            policy,
            invalid_report_delay=INVALID_REPORT_DELAY,
            settle_seconds=LOCAL_SETTLE_SECONDS,
            progress=self._ping_watchdog,
        )
        _shorten_move_pairing()
        self._wake = _Waker()
        self._lookout = Lookout(self._wake.set)
        self._pass_requested = True
        self._names: set[str] = set()
        self._lazy_names: set[str] = set()
        self._polled: set[str] = set()
        self._polled_lazy: set[str] = set()
        self._names_lock = threading.Lock()
        self._stop_requested = False
        self._stop_signal: int | None = None
        self._reload_requested = False
        self._watch: _Watch | None = None
        self._last_pass = 0.0
        self._last_full_pass = 0.0
        self._last_folder_check = 0.0
        self._next_ping = 0.0
        self._waiting_reported = False
        self._ready_sent = False
        self._restarts: collections.deque[float] = collections.deque()
        self._overflow_handler = _OverflowHandler(self)

    # Called from other threads and signal handlers: set a flag, then wake the main loop.

    def request_pass(self) -> None:
        self._pass_requested = True
        self._wake.set()

    def request_names(self, names: set[str], lazy: bool) -> None:
        """Ask for a pass over these names; a lazy one waits MODIFIED_PASS_INTERVAL after the last."""
        with self._names_lock:
            (self._lazy_names if lazy else self._names).update(names)
        self._wake.set()

    def _hold_for_poll(self, names: set[str], lazy: bool) -> None:
        """Keep names that a poll reported until the marker that ends its events."""
        with self._names_lock:
            (self._polled_lazy if lazy else self._polled).update(names)

    def _release_poll(self) -> None:
        with self._names_lock:
            polled, self._polled = self._polled, set()
            polled_lazy, self._polled_lazy = self._polled_lazy, set()
        if polled:
            self.request_names(polled, lazy=False)
        if polled_lazy:
            self.request_names(polled_lazy, lazy=True)

    def request_stop(self, signum: int, _frame=None) -> None:
        # No logging here. A handler that interrupts a write to the log (one blocked on a full
        # pipe) raises when it writes, and the flag below would never be set. The loop logs it.
        self._stop_signal = signum
        self._stop_requested = True
        self._wake.set()

    def request_reload(self, _signum: int, _frame=None) -> None:
        self._reload_requested = True
        self._wake.set()

    def note_event(self, event: FileSystemEvent) -> None:
        """Ask for the pass an event calls for: over its names, over the folder, or none."""
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return
        if kind == "poll_done":
            self._release_poll()
            return
        watch = self._watch
        if watch is None:
            return
        if event.is_directory:
            # Each change inside the folder also reports the folder itself as modified, which adds
            # nothing. Only the folder deleted or moved calls for the folder checks.
            if kind in ("deleted", "moved") and watch.observed in (event.src_path, event.dest_path):
                self.request_pass()
            return
        names = set()
        for path in (event.src_path, event.dest_path):
            if not path:
                continue
            folder, name = os.path.split(path)
            if folder != watch.observed:
                # Not an event on a name in the folder: look at the whole folder.
                self.request_pass()
                return
            if name == LOCK_NAME and kind in ("deleted", "moved"):
                # The folder cannot be removed with the lock file in it, so this is the first
                # sign of a folder being deleted. The pass checks the folder first.
                self.request_pass()
                return
            if self._name_matters(kind, path, name):
                names.add(name)
        if names:
            if watch.observer_kind == "polling":
                self._hold_for_poll(names, lazy=kind == "modified")
            else:
                self.request_names(names, lazy=kind == "modified")

    def _name_matters(self, kind: str, path: str, name: str) -> bool:
        """Return whether a name can change what a pass decides."""
        if name == LOCK_NAME or name.startswith(PRUNING_PREFIX):
            return False
        if self._pruner.matcher.match(name):
            return True
        # A link that appears or goes changes which checkpoints are protected.
        if name in self._pruner.link_names:
            return True
        return kind in ("created", "moved") and os.path.islink(path)

    def run(self) -> int:
        """Watch until SIGTERM or SIGINT and return the exit status."""
        previous = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, self.request_stop),
            signal.SIGINT: signal.signal(signal.SIGINT, self.request_stop),
            signal.SIGHUP: signal.signal(signal.SIGHUP, self.request_reload),
        }
        logging.getLogger("watchdog.observers").addHandler(self._overflow_handler)
        try:
            return self._loop()
        except LockError as error:
            log.error("%s", error)
            return EXIT_RUNTIME
        except Exception:
            log.exception("the watcher failed; exiting so the service manager can restart it")
            return EXIT_RUNTIME
        finally:
            self._notifier.stopping()
            self._detach()
            self._lookout.stop()
            logging.getLogger("watchdog.observers").removeHandler(self._overflow_handler)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._notifier.close()
            log.info("stopped")

    def _loop(self) -> int:
        while not self._stop_requested:
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            now = time.monotonic()
            if self._watch is None:
                self._attach()
            elif (
                now - self._last_folder_check >= FOLDER_CHECK_INTERVAL
                or self._pass_requested
                or self._names  # an event woke the loop, and the checks cost two stat calls
            ):
                self._last_folder_check = now
                if self._folder_replaced() or self._lock_lost():
                    self._detach()
                    continue
                if not self._observer_healthy() and not self._restart_observer():
                    return EXIT_RUNTIME

            if self._watch is not None and self._pass_due():
                self._pass_requested = False
                self._take_names(everything=True)
                self._run_pass()
            elif self._watch is not None and self._names_due():
                self._run_pass(self._take_names(everything=self._lazy_due()))
            self._ping_watchdog()
            self._wake.wait(self._sleep_time())
            self._wake.clear()
        if self._stop_signal is not None:
            log.info("received %s: stopping", signal.Signals(self._stop_signal).name)
        return EXIT_OK

    # The folder

    def _attach(self) -> None:
        path = os.path.abspath(self.policy.directory)
        try:
            dir_fd = open_folder(path)
        except FolderError as error:
            self._wait_for(path, error)
            return
        try:
            lock_fd = acquire_lock(dir_fd, path)
        except LockError:
            os.close(dir_fd)
            raise
        info = os.fstat(dir_fd)
        identity = (info.st_dev, info.st_ino)
        # The observer is given the real path: watchdog does not follow a symbolic link as the
        # last part of the path it watches, and would then report no event in the folder.
        observed = os.path.realpath(path)
        try:
            if _identity(observed) != identity:
                raise FileNotFoundError(errno.ENOENT, "the folder was replaced while opened")
            observer, kind = self._start_observer(observed)
        except OSError as error:
            if lock_fd is not None:
                os.close(lock_fd)
            os.close(dir_fd)
            # FileNotFoundError: deleted or replaced again between opening and watching.
            self._wait_for(path, FolderError(error.errno, f"cannot watch {path}: {error}"))
            return
        self._lookout.stop()
        self._watch = _Watch(path, observed, dir_fd, lock_fd, identity, observer, kind)
        self._waiting_reported = False
        self._pass_requested = True
        self._last_folder_check = time.monotonic()
        if observed == path:
            log.info("watching %s with the %s observer", path, kind)
        else:
            log.info("watching %s, which is %s, with the %s observer", path, observed, kind)

    def _wait_for(self, path: str, error: FolderError) -> None:
        """Watch for the folder at `path` to become usable, and report the wait once."""
        if self.policy.polling:
            self._lookout.stop()  # inotify is not trusted here, so the loop polls
        elif self._lookout.follow(path):
            self._wake.set()  # the folder may have appeared before the watch was set
        if self._waiting_reported:
            return
        self._waiting_reported = True
        if error.errno == errno.ENOENT:
            log.info("%s; waiting for it to appear", error.strerror)
        else:
            log.error(
                "%s; trying again when it changes, and at least every %.0f s",
                error.strerror,
                self._waiting_interval(),
            )
        status = f"waiting for {self.policy.directory}"
        if self._ready_sent:
            self._notifier.status(status)
        else:
            self._notifier.ready(status)
            self._ready_sent = True

    def _folder_replaced(self) -> bool:
        watch = self._watch
        try:
            info = os.stat(watch.path)
        except OSError:
            log.warning("checkpoint folder %s was deleted or moved away", watch.path)
            return True
        if (info.st_dev, info.st_ino) != watch.identity:
            log.warning("checkpoint folder %s was replaced", watch.path)
            return True
        return False

    def _lock_lost(self) -> bool:
        """Return whether the lock file was deleted or replaced since the folder was locked.

        The lock is then held on a file that no longer has the name, so a second watcher could
        lock the folder. Attaching again locks it under the name, or exits if another did.
        """
        watch = self._watch
        if watch.lock_fd is None or _same_file(watch.lock_fd, LOCK_NAME, watch.dir_fd):
            return False
        log.warning(
            "the lock file %s in %s was deleted or replaced; locking the folder again",
            LOCK_NAME,
            watch.path,
        )
        return True

    def _detach(self) -> None:
        watch, self._watch = self._watch, None
        if watch is None:
            return
        stop_observer(watch.observer)
        if watch.lock_fd is not None:
            os.close(watch.lock_fd)
        os.close(watch.dir_fd)

    # The observer

    def _start_observer(self, path: str) -> tuple[BaseObserver, str]:
        polling = self.policy.polling
        fstype = network_filesystem(path)
        self._pruner.set_settle_seconds(
            SHARED_SETTLE_SECONDS if fstype is not None else LOCAL_SETTLE_SECONDS
        )
        if polling is None and fstype is not None:
            log.info(
                "%s is on a %s filesystem, where inotify misses writes made by other "
                "hosts: using the polling observer",
                path,
                fstype,
            )
            polling = True
        if not polling:
            try:
                return self._schedule(Observer(), path, INOTIFY_EVENTS), "inotify"
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EMFILE):
                    raise
                log.warning(
                    "inotify limit reached (%s): falling back to the polling observer; raise "
                    "fs.inotify.max_user_watches or fs.inotify.max_user_instances to use inotify",
                    error,
                )
        return self._schedule(_polling_observer(), path), "polling"

    def _schedule(
        self, observer: BaseObserver, path: str, events: list[type] | None = None
    ) -> BaseObserver:
        try:
            observer.schedule(_EventHandler(self), path, recursive=False, event_filter=events)
            observer.start()
        except BaseException:
            stop_observer(observer)
            raise
        return observer

    def _observer_healthy(self) -> bool:
        observer = self._watch.observer
        dead = [] if observer.is_alive() else ["event dispatch thread"]
        dead += [f"emitter for {e.watch.path}" for e in list(observer.emitters) if not e.is_alive()]
        if dead:
            log.error(
                "the %s observer stopped: %s died", self._watch.observer_kind, ", ".join(dead)
            )
        return not dead

    def _restart_observer(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW:
            self._restarts.popleft()
        if len(self._restarts) >= MAX_OBSERVER_RESTARTS:
            log.error(
                "the observer failed %d times in %.0f s; exiting so the service manager "
                "can restart the watcher",
                len(self._restarts) + 1,
                RESTART_WINDOW,
            )
            return False
        self._restarts.append(now)
        watch = self._watch
        stop_observer(watch.observer)
        try:
            watch.observer, watch.observer_kind = self._start_observer(watch.observed)
        except OSError as error:
            log.error("failed to restart the observer on %s: %s", watch.path, error)
            self._detach()
            return True  # the folder is attached again, with a new observer, on the next turn
        log.info("restarted the %s observer; running a full pass", watch.observer_kind)
        self._pass_requested = True
        return True

    # Passes, reloads and service notices

    def _pass_due(self) -> bool:
        """Return whether a pass over the whole folder is due."""
        since_full = time.monotonic() - self._last_full_pass
        return self._pass_requested or since_full >= self.policy.rescan_interval

    def _lazy_due(self) -> bool:
        return time.monotonic() - self._last_pass >= MODIFIED_PASS_INTERVAL

    def _names_due(self) -> bool:
        return bool(self._names) or (bool(self._lazy_names) and self._lazy_due())

    def _take_names(self, everything: bool) -> set[str]:
        """Take the names waiting for a pass, and with `everything` the lazy ones too."""
        with self._names_lock:
            names, self._names = self._names, set()
            if everything:
                names |= self._lazy_names
                self._lazy_names = set()
        return names

    def _run_pass(self, names: set[str] | None = None) -> None:
        """Run a pass over the whole folder, or over `names` only."""
        self._last_pass = time.monotonic()
        if names is None:
            self._last_full_pass = self._last_pass
        try:
            if names is None:
                summary = self._pruner.run(self._watch.dir_fd)
            else:
                summary = self._pruner.run_changed(self._watch.dir_fd, names)
        except UnsafePlanError as error:
            log.error("%s", error)
            return
        except OSError as error:
            log.warning(
                "pass failed on %s: %s; retrying after the next event or check",
                self._watch.path,
                error,
            )
            return
        except Exception:
            # A bug must not stop the watcher for good: the failed pass deleted nothing after the
            # failure, and the next event or rescan tries again.
            log.exception(
                "pass failed on %s; retrying after the next event or check", self._watch.path
            )
            return
        if summary is None:
            return
        log.info("%s", summary.describe())
        if self._ready_sent:
            self._notifier.status(summary.describe())
        else:
            self._notifier.ready(summary.describe())
            self._ready_sent = True

    def _reload(self) -> None:
        try:
            policy = self._load_policy()
        except ConfigError as error:
            log.error("config reload failed, keeping the current policy: %s", error)
            return
        log.info("config reloaded: %s", policy.describe())
        if (policy.directory, policy.polling) != (self.policy.directory, self.policy.polling):
            self._detach()
        self.policy = policy
        self._pruner.replace_policy(policy)
        self._pass_requested = True

    def _ping_watchdog(self) -> None:
        interval = self._notifier.watchdog_interval
        now = time.monotonic()
        if interval is None or now < self._next_ping:
            return
        if self._watch is not None and not self._observer_healthy():
            return  # no ping, so the service manager notices a watcher that cannot recover
        self._notifier.watchdog()
        self._next_ping = now + interval

    def _sleep_time(self) -> float:
        now = time.monotonic()
        deadlines = [FOLDER_CHECK_INTERVAL if self._watch is not None else self._waiting_interval()]
        if self._watch is not None:
            deadlines.append(self._last_full_pass + self.policy.rescan_interval - now)
            if self._lazy_names:
                deadlines.append(self._last_pass + MODIFIED_PASS_INTERVAL - now)
        if self._notifier.watchdog_interval is not None:
            deadlines.append(self._next_ping - now)
        return max(0.0, min(deadlines))

    def _waiting_interval(self) -> float:
        """Return the seconds between checks for a missing folder."""
        return FOLDER_CHECK_INTERVAL if self._lookout.active else WAIT_INTERVAL


def _same_file(fd: int, name: str, dir_fd: int) -> bool:
    """Return whether `name` in the folder `dir_fd` is still the file open as `fd`."""
    try:
        named = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    locked = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (locked.st_dev, locked.st_ino)


def _identity(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _shorten_move_pairing() -> None:
    """Shorten the time watchdog waits for the second half of a rename (MOVE_PAIRING_DELAY)."""
    try:
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    except ImportError:  # not on Linux, or a watchdog without the grouper
        return
    if isinstance(getattr(InotifyMoveEventGrouper, "delay", None), (int, float)):
        InotifyMoveEventGrouper.delay = MOVE_PAIRING_DELAY


class _Waker:
    """Wake-up call for the main loop, safe from other threads and from signal handlers.

    threading.Event does not suit signal handlers. Its set() takes a lock that the main thread
    holds for a moment inside wait() and clear(), and a handler that runs in that moment waits
    for its own thread forever. A byte written into a pipe takes no lock.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so a wake-up is pending anyway

    def wait(self, timeout: float | None) -> None:
        """Return when set() was called since the last clear(), or after `timeout` seconds."""
        select.select([self._read], [], [], timeout)

    def clear(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
