"""Carry out a retention plan: delete relative to an open handle on the folder, never via a link."""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import NamedTuple

from watcher.deleters import ForkFailed, can_fork, run_spread
from watcher.logs import info_writer
from watcher.policy import Decision, Plan
from watcher.scan import Entry
from watcher.validity import Verdict
from watcher.validity.checks import CHANGED, GONE, is_version

log = logging.getLogger(__name__)

PRUNING_PREFIX = ".ckpt-watcher.pruning."
"""Prefix of the hidden name a checkpoint gets just before it is deleted. Its leading dot and
fixed text mean no pattern can take it for a checkpoint: no digits follow a leading `*`."""


@dataclass
class PruneResult:
    pruned: int = 0
    bytes_freed: int = 0
    skipped: int = 0
    """Files left in place because they changed or vanished since the scan."""
    failures: list[tuple[int, str]] = field(default_factory=list)
    """Deletions that failed, by index in Plan.pruned, with the error, for the caller to report."""
    gone: list[str] = field(default_factory=list)
    """Names deleted by this plan, or found gone already."""
    kept_invalid: dict[str, Verdict] = field(default_factory=dict)
    """Files the plan prunes that the confirm callback kept, because they are invalid."""
    errors: list[str] = field(default_factory=list)
    """Failures not tied to one file, such as a deleting process that died."""

    def add(self, other: PruneResult) -> None:
        self.pruned += other.pruned
        self.bytes_freed += other.bytes_freed
        self.skipped += other.skipped
        self.failures += other.failures
        self.gone += other.gone
        self.kept_invalid.update(other.kept_invalid)
        self.errors += other.errors


def execute_plan(
    plan: Plan,
    dir_fd: int,
    dry_run: bool,
    confirm: Callable[[Decision], Verdict | None] | None = None,
    processes: int = 1,
    hidden_names: Collection[str] | None = None,
    progress: Callable[[], None] | None = None,
) -> PruneResult:
    """Delete each file the plan prunes, logging the file, its step, series, reason and size.

    A file that is gone already is skipped quietly, one that changed since the scan is left for the
    next pass, and a failed deletion is recorded in the result and the rest of the plan still runs.
    A dry run deletes nothing and only counts what would go. `confirm`, when given, is called for
    each file just before its deletion. A file it returns GONE or CHANGED for is skipped as above,
    and one it returns another verdict for is kept as invalid.

    With `processes` above 1, a large plan is carried out by that many forked processes (see
    watcher.deleters); the caller must have no other thread running.

    `hidden_names`, from a scan just before, are the names in the folder that start with
    PRUNING_PREFIX. A deletion whose hidden name is among them fails, as a deletion whose hidden
    name is taken must. Without them each deletion looks its hidden name up first. The scan lists
    every file an interrupted deletion left, and while the watcher holds the folder's lock, only
    its own deletions make new hidden names, each for a name it prunes once.

    `progress`, when given, is called once per file that this process checks or deletes.
    """
    decisions = plan.pruned
    delete = _Deleter(dir_fd, info_writer(log), hidden_names)
    result = None
    if not dry_run and can_fork(processes, len(decisions)):
        try:
            result = _execute_spread(decisions, confirm, processes, delete)
        except ForkFailed as error:
            log.warning("%s; deleting from this process alone", error.strerror)
    if result is None:
        result = PruneResult()
        for index, decision in enumerate(decisions):
            if progress is not None:
                progress()
            if not _confirmed(decision, confirm, result):
                continue
            if dry_run:
                result.pruned += 1
                result.bytes_freed += decision.entry.stat.st_size
            else:
                delete(_Target.of(decision, index), result)
    return result


def _confirmed(decision: Decision, confirm, result: PruneResult) -> bool:
    """Return whether `confirm` lets the file go, recording in `result` a file it keeps.

    `confirm` returns None for a file that may go, GONE or CHANGED for a name that no longer
    is the scanned file, which is left for the next pass, or the verdict of an invalid file.
    """
    verdict = None if confirm is None else confirm(decision)
    if verdict is None:
        return True
    name = decision.entry.name
    if verdict is GONE:
        _skip_gone(name, result)
    elif verdict is CHANGED:
        _skip_changed(name, result)
    else:
        result.kept_invalid[name] = verdict
    return False


def _skip_gone(name: str, result: PruneResult) -> None:
    """Record a name that is gone already, so nothing is deleted."""
    log.info("already gone, nothing to prune: %r", name)
    result.skipped += 1
    result.gone.append(name)


def _skip_changed(name: str, result: PruneResult) -> None:
    """Record a file that changed since the scan, which stays for the next pass."""
    log.warning("%r changed since the scan, left in place for the next pass", name)
    result.skipped += 1


class _Target(NamedTuple):
    """The facts about one file that its deletion needs."""

    index: int
    """Index of the decision in Plan.pruned."""
    name: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    """Device, inode, size and mtime of the file when scanned."""
    step: int
    series: str
    reason: str

    @classmethod
    def of(cls, decision: Decision, index: int) -> _Target:
        entry = decision.entry
        info = entry.stat
        return cls(
            index,
            entry.name,
            info.st_dev,
            info.st_ino,
            info.st_size,
            info.st_mtime_ns,
            entry.step,
            entry.series,
            decision.reason,
        )


_NAME_BYTES = 255
_RECORD = struct.Struct(f"=IIQQqqqB{_NAME_BYTES}s")
"""A _Target as sent to a deleting process: index, group, dev, ino, size, mtime_ns, step, the
length of the name in bytes and the name. The group indexes a table of (series, reason) pairs
made before the fork."""


def _execute_spread(
    decisions: list[Decision], confirm, processes: int, delete: _Deleter
) -> PruneResult:
    """Check each file here and have forked processes delete the ones that pass.

    NOTE: this process checks every file alone, so it is the busiest process of a large pass. On
    2 cores the pass is at best on par with a glob+mtime sort, because the processes together run
    out of CPU: a second checking process made it slower there. More cores are not measured.
    NOTE: a file waits in the queue for up to a fraction of a second after its check. Content
    changed in that time, with the size and mtime put back, goes unnoticed by the deletion.
    """
    # This process records the files the check keeps. Each deleting process fills its own copy,
    # forked while still empty, and sends it back.
    own = PruneResult()
    groups: list[tuple[str, str]] = []
    group_of: list[int] = []
    series = reason = None
    for decision in decisions:  # in plan order, so the files of a series follow each other
        if decision.entry.series != series or decision.reason != reason:
            series, reason = decision.entry.series, decision.reason
            groups.append((series, reason))
        group_of.append(len(groups) - 1)

    def feed():
        pack = _RECORD.pack
        for index, decision in enumerate(decisions):
            if not _confirmed(decision, confirm, own):
                continue
            entry = decision.entry
            info = entry.stat
            name = os.fsencode(entry.name)
            try:
                record = pack(
                    index,
                    group_of[index],
                    info.st_dev,
                    info.st_ino,
                    info.st_size,
                    info.st_mtime_ns,
                    entry.step,
                    len(name),
                    name,
                )
            except struct.error:
                # A field out of its range: a name over 255 bytes, a step over 2**63 - 1 or an
                # mtime after the year 2262. This process deletes that file itself.
                delete(_Target.of(decision, index), own)
                continue
            yield record

    def work(batch: list[tuple], stopping: Callable[[], bool]) -> None:
        targets = []
        for index, group, dev, ino, size, mtime_ns, step, length, name in batch:
            series, reason = groups[group]
            targets.append(
                _Target(
                    index,
                    os.fsdecode(name[:length]),
                    dev,
                    ino,
                    size,
                    mtime_ns,
                    step,
                    series,
                    reason,
                )
            )
        delete.delete_batch(targets, own, stopping)

    log.info(
        "checking %d files here and deleting the valid ones from %d processes",
        len(decisions),
        processes,
    )
    reports, lost = run_spread(feed(), _RECORD, processes, work, lambda: own)
    result = own
    for report in reports:
        result.add(report)
    for message in lost:
        log.error("%s", message)
        result.errors.append(message)
    return result


def _never() -> bool:
    return False


class _Deleter:
    """Deleter of the checkpoints of one plan, one file or one batch at a time; see execute_plan
    for its arguments."""

    def __init__(
        self,
        dir_fd: int,
        note: Callable[[str, dict | None], None],
        hidden_names: Collection[str] | None,
    ) -> None:
        self.dir_fd = dir_fd
        self.note = note
        self.hidden_names = None if hidden_names is None else frozenset(hidden_names)

    def __call__(self, target: _Target, result: PruneResult) -> None:
        """Delete one checkpoint; see delete_batch."""
        self.delete_batch([target], result)

    def delete_batch(
        self, targets: list[_Target], result: PruneResult, stopping: Callable[[], bool] = _never
    ) -> None:
        """Delete a few checkpoints, making sure each file deleted is the one the plan was made for.

        Each name is first renamed to a hidden name, so whatever sits under the name at that
        instant is out of reach of any writer. Only then is it compared with the scanned file. A
        new save or a link that replaced the file after the scan is put back, never deleted, and
        unlink never follows a link.

        The batch goes through each step in turn: hide and compare every file, unlink them, then
        log them. An unlink waits for the disk, and Python code run right after that wait is
        slow, probably because its data has left the CPU's caches. In a loop over 30,000 files,
        a log line right after each unlink cost 53 us of CPU per file, against 43 us with the
        lines of 13 files written after their unlinks. A process killed with SIGKILL can
        therefore lose the lines of one batch. `stopping()` is called before each file. Once it
        returns true, the files not unlinked yet are put back under their names.
        """
        hidden: list[tuple[_Target, str]] = []
        deleted: list[_Target] = []
        try:
            for target in targets:
                if stopping():
                    break
                hidden_name = self._hide(target, result)
                if hidden_name is not None:
                    hidden.append((target, hidden_name))
            dir_fd = self.dir_fd
            while hidden and not stopping():
                target, hidden_name = hidden.pop(0)
                try:
                    os.unlink(hidden_name, dir_fd=dir_fd)
                except OSError as error:
                    _put_back(hidden_name, target.name, dir_fd)
                    result.failures.append((target.index, _deletion_error(error)))
                    continue
                deleted.append(target)
        finally:
            try:
                for target, hidden_name in hidden:
                    _put_back(hidden_name, target.name, self.dir_fd)
            finally:
                self._log_deleted(deleted, result)

    def _hide(self, target: _Target, result: PruneResult) -> str | None:
        """Rename the file to its hidden name and return that name if it is the scanned file.

        Otherwise record why in `result`, put back what was renamed, and return None.
        """
        name = target.name
        dir_fd = self.dir_fd
        hidden = PRUNING_PREFIX + name
        try:
            if self._taken(hidden):
                # An interrupted deletion left that file, which the watcher never deletes, so the
                # rename is not even tried.
                result.failures.append((target.index, _HIDDEN_NAME_TAKEN.format(hidden=hidden)))
                return None
            _rename_to_hidden(name, hidden, dir_fd)
        except FileExistsError:
            result.failures.append((target.index, _HIDDEN_NAME_TAKEN_NOW.format(hidden=hidden)))
            return None
        except FileNotFoundError:
            _skip_gone(name, result)
            return None
        except OSError as error:
            result.failures.append((target.index, _deletion_error(error)))
            return None
        try:
            current = os.stat(hidden, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as error:
            _put_back(hidden, name, dir_fd)
            result.failures.append((target.index, _deletion_error(error)))
            return None
        if not is_version(current, target.dev, target.ino, target.size, target.mtime_ns):
            # A link swapped in or a new save since the scan: the plan does not apply to it.
            _put_back(hidden, name, dir_fd)
            _skip_changed(name, result)
            return None
        return hidden

    def _log_deleted(self, deleted: list[_Target], result: PruneResult) -> None:
        note = self.note
        for target in deleted:
            name = target.name
            note(
                "pruned " + describe(name, target.step, target.series, target.size, target.reason),
                checkpoint_fields(
                    "pruned", name, target.step, target.series, target.size, target.reason
                ),
            )
            result.gone.append(name)
            result.pruned += 1
            result.bytes_freed += target.size

    def _taken(self, hidden: str) -> bool:
        if self.hidden_names is None:
            return _exists(hidden, self.dir_fd)
        return hidden in self.hidden_names


_HIDDEN_NAME_TAKEN = (
    "its hidden name {hidden!r} is taken by a file that an interrupted deletion left; the watcher "
    "never deletes that file, so move it away or delete it by hand"
)


_HIDDEN_NAME_TAKEN_NOW = (
    "its hidden name {hidden!r} was taken by another file during the pass; the watcher never "
    "deletes that file, so move it away or delete it by hand"
)

_RENAME_NOREPLACE = 1
"""Flag of Linux's renameat2 that makes it fail with EEXIST instead of replacing the target."""


def _load_renameat2():
    """Return libc's renameat2 and ctypes.get_errno, or (None, None) where libc lacks renameat2."""
    try:
        import ctypes  # the daemon has it loaded already, through watchdog's inotify support

        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, ImportError):
        return None, None
    function.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    )
    function.restype = ctypes.c_int
    return function, ctypes.get_errno


_renameat2, _get_errno = _load_renameat2()


def _rename_to_hidden(name: str, hidden: str, dir_fd: int) -> None:
    """Rename `name` to `hidden` in the folder, never replacing a file that has that name.

    Raise FileExistsError when `hidden` exists. Where renameat2 or its flag is missing (an old
    C library or kernel, a filesystem without the flag), the hidden name is looked up first.
    NOTE: that fallback leaves a window of microseconds in which a file created under the
    hidden name is replaced.
    """
    if _renameat2 is not None:
        if not _renameat2(
            dir_fd, os.fsencode(name), dir_fd, os.fsencode(hidden), _RENAME_NOREPLACE
        ):
            return
        code = _get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), name)
    if _exists(hidden, dir_fd):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), hidden)
    os.rename(name, hidden, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _restore(hidden: str, name: str, dir_fd: int) -> bool:
    """Put a file back under its name unless another file has that name, and return whether it did.

    The file stays under its hidden name when the name is taken, and nothing happens when the
    hidden name is gone.
    """
    try:
        # link() never replaces an existing name, unlike rename(), so a newer file is safe.
        os.link(hidden, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        return False
    except FileNotFoundError:
        return False
    except OSError:
        # NOTE: on a filesystem without hard links this rename can replace a file that took the
        # name in the microseconds since the check below.
        if _exists(name, dir_fd):
            return False
        os.rename(hidden, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return True
    os.unlink(hidden, dir_fd=dir_fd)
    return True


def _put_back(hidden: str, name: str, dir_fd: int) -> None:
    """Restore a file that a deletion hid, warning when a newer file took its name meanwhile."""
    if not _restore(hidden, name, dir_fd) and _exists(hidden, dir_fd):
        log.warning(
            "%r was replaced twice during its deletion; the older file is kept as %r", name, hidden
        )


def restore_interrupted(
    dir_fd: int, names: list[str], progress: Callable[[], None] | None = None
) -> None:
    """Give back their names to files left hidden by a deletion that a crash interrupted.

    `progress`, when given, is called once per name.
    """
    for hidden in names:
        if progress is not None:
            progress()
        name = hidden[len(PRUNING_PREFIX) :]
        try:
            restored = _restore(hidden, name, dir_fd)
        except OSError as error:
            log.warning("cannot restore %r to %r: %s", hidden, name, error)
            continue
        if restored:
            log.info(
                "restored %r, hidden by a deletion that was interrupted, for the next pass", name
            )
        elif _exists(hidden, dir_fd):
            log.warning(
                "cannot restore %r, hidden by a deletion that was interrupted, because another "
                "file now has that name; the hidden file %r stays and is never deleted, so move "
                "it away or delete it by hand",
                name,
                hidden,
            )


def _deletion_error(error: OSError) -> str:
    text = str(error)
    if error.errno == errno.ENAMETOOLONG:
        text += f"; the name is too long to take the prefix {PRUNING_PREFIX!r} for a safe deletion"
    if error.errno in (errno.EPERM, errno.EACCES):
        text += (
            "; the watcher needs write permission on the folder, and in a sticky folder "
            "(mode +t) only the file's owner may delete it"
        )
    return text


def describe_decision(decision: Decision) -> str:
    entry = decision.entry
    return describe(entry.name, entry.step, entry.series, entry.stat.st_size, decision.reason)


def entry_fields(event: str, entry: Entry, reason: str) -> dict:
    """Return the JSON log fields of `event` about the checkpoint `entry`."""
    return checkpoint_fields(
        event, entry.name, entry.step, entry.series, entry.stat.st_size, reason
    )


def checkpoint_fields(
    event: str, name: str, step: int, series: str, size: int, reason: str
) -> dict:
    """Return the JSON log fields of `event` about one checkpoint."""
    return {
        "event": event,
        "file": name,
        "step": step,
        "series": series,
        "bytes": size,
        "reason": reason,
    }


def describe(name: str, step: int, series: str, size: int, reason: str) -> str:
    """Return the text that names one checkpoint and the reason for its decision in the log."""
    return f"{name!r} (step {step}, series {series!r}, {size} bytes): {reason}"
