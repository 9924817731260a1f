"""Spread the deletions of a large one-shot pass over forked processes.

A large pass spends its time in the validity check of each file just before its deletion, and
in the kernel, renaming and unlinking. On the ext4 disk of the benchmarks, an unlink spends most
of its time off the CPU, waiting in the kernel, and those waits overlap across processes. Threads
cannot share the work, because the Python code between the system calls holds the interpreter
lock, but forked processes can. The main process checks each file and hands the ones to delete
to a few deleting processes through one pipe, as fixed-size records that contain all a deletion
needs. Each deletes and logs the files it takes, then sends its counts back through a pipe of its
own. The records spare the deleting processes from reading the main process's objects: each
object read is a reference count written, which copied most of the main process's memory into
every deleting process.

Forking is only safe with no other thread running, so the daemon, whose observer runs threads,
never gets here: only --once does.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import select
import signal
import struct
import sys
import threading
from collections.abc import Callable, Iterable

from watcher.logs import write_all

log = logging.getLogger(__name__)

MIN_FILES = 1000
"""Smallest plan that is spread. Below it one process deletes, because the forks and reports
would cost more than they save (an estimate: 3 forks take a few ms, a file about 0.1 ms)."""

MAX_PROCESSES = 6
"""Most deleting processes a pass starts."""


def batch_size(record: struct.Struct) -> int:
    """Return how many records go into one write to the queue, and at most into one read.

    A write of at most PIPE_BUF bytes is atomic and every write contains whole records, so a read
    of a multiple of their size returns whole ones, whichever process makes it.
    """
    return max(1, min(16, select.PIPE_BUF // record.size))


_PR_SET_PDEATHSIG = 1

QUEUE_BYTES = 1 << 20
"""Size asked for the queue's pipe; Linux lets any user set up to 1 MiB by default."""


def process_count() -> int:
    """Return how many processes a large one-shot pass should delete from; 1 means no forking.

    The main process keeps one core busy with checks. The deleting processes spend most of their
    time waiting on the disk, so there are three of them per core, up to MAX_PROCESSES. On 2
    cores and 100,000 files, 6 took 7.13 s, against 8.03 s for 4 and 7.22 s for 8 (medians of 3
    interleaved runs).
    NOTE: only 2 cores were measured. With more, the single checking process becomes the limit.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return 1 if cores < 2 else min(MAX_PROCESSES, 3 * cores)


def can_fork(processes: int, files: int) -> bool:
    """Return whether a plan of `files` deletions should be spread over `processes` processes."""
    return (
        processes > 1
        and files >= MIN_FILES
        and hasattr(os, "fork")
        and threading.active_count() == 1
    )


class ForkFailed(OSError):
    """A deleting process could not be started; nothing was deleted by any of them."""


def run_spread(
    feed: Iterable[bytes],
    record: struct.Struct,
    processes: int,
    work: Callable[[list[tuple], Callable[[], bool]], None],
    report: Callable[[], object],
) -> tuple[list[object], list[str]]:
    """Run `work(batch, stopping)` in forked processes for the records that `feed` yields.

    Each record is packed with `record`. A process reads up to batch_size(record) records at a
    time, and `work` gets their unpacked fields as a list. It must stop between records once
    `stopping()` returns true, leaving the records not reached untouched. `feed` runs in this
    process, while the processes work through the records it has yielded.
    When they are done, each sends what `report()` returns in it (it must pickle) back to this
    process. A failed fork raises ForkFailed before `feed` starts, with nothing done. Return the
    reports and a message for each process that did not finish its share. On KeyboardInterrupt
    in this process, every process gets SIGTERM and stops between two files. Their reports
    are collected, and the interrupt is raised again.
    """
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None when the file descriptor was closed at start
            stream.flush()
    queue_read, queue_write = os.pipe()
    _enlarge(queue_write)
    children: list[_Child] = []
    try:
        try:
            for _ in range(processes):
                _fork(queue_read, queue_write, record, work, report, children)
        except OSError as error:
            os.close(queue_write)
            queue_write = -1
            _collect(children, batch_size(record))
            raise ForkFailed(error.errno, f"cannot start a deleting process: {error}") from None
        finally:
            os.close(queue_read)
        try:
            _send(feed, batch_size(record) * record.size, queue_write, children)
        finally:
            # Marked closed before the close, so that an interrupt cannot make it close twice.
            write_end, queue_write = queue_write, -1
            os.close(write_end)
        return _collect(children, batch_size(record))
    except ForkFailed:
        raise
    except BaseException:
        # A second Ctrl-C waits until every process is stopped and collected, then interrupts.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if queue_write >= 0:
                os.close(queue_write)
            _stop(children)
            _collect(children, batch_size(record))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        raise


def _enlarge(pipe_fd: int) -> None:
    """Let the queue contain QUEUE_BYTES, so that the checks can run ahead of the deletions.

    The default 64 KiB contain about 200 records. With that little ahead, the deleting processes
    waited for the main process, and a pass over 100,000 files took about 8% longer.
    """
    try:
        fcntl.fcntl(pipe_fd, fcntl.F_SETPIPE_SZ, QUEUE_BYTES)
    except (AttributeError, OSError):
        pass  # above the user's pipe limits, or no such fcntl: the default size still works


def _send(
    feed: Iterable[bytes], batch_bytes: int, queue_write: int, children: list[_Child]
) -> None:
    """Write the records from `feed` into the queue in batches of `batch_bytes`.

    While the queue is full, the reports of the processes are read: a process that stopped early
    writes its report at once, and would wait on a full report pipe while this process waited on
    the full queue. When no process is left, log that and stop.
    """
    os.set_blocking(queue_write, False)
    batch = bytearray()
    try:
        for packed in feed:
            batch += packed
            if len(batch) >= batch_bytes:
                _put(queue_write, batch, children)
                batch.clear()
        if batch:
            _put(queue_write, batch, children)
    except BrokenPipeError:
        # Not one of the messages returned: those count the processes that stopped early.
        log.error(
            "no deleting process is left, so the pass stopped; files not reached are untouched"
        )


def _put(queue_write: int, batch: bytearray, children: list[_Child]) -> None:
    """Write one batch, of at most PIPE_BUF bytes and so all or nothing, into the queue."""
    while True:
        try:
            os.write(queue_write, batch)
            return
        except BlockingIOError:
            pass
        reports = [child.read_fd for child in children if child.read_fd >= 0]
        readable, _, _ = select.select(reports, [queue_write], [])
        for child in children:
            if child.read_fd in readable:
                _read_report(child)


class _Child:
    """A forked process and the pipe its report comes back through."""

    def __init__(self, pid: int, read_fd: int) -> None:
        self.pid = pid
        self.read_fd = read_fd
        self.data = bytearray()
        self.status: int | None = None


def _fork(
    queue_read: int, queue_write: int, record: struct.Struct, work, report, children: list[_Child]
) -> None:
    """Fork one deleting process and add it to `children`.

    SIGINT and SIGTERM are held back until the new process has set its handlers and this one
    has recorded it, so an interrupt cannot leave a process running unrecorded.
    """
    read_fd, write_fd = os.pipe()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        try:
            pid = os.fork()
        except OSError:
            os.close(read_fd)
            os.close(write_fd)
            raise
        if pid == 0:  # the new process: it must never return into the caller's code
            try:
                os.close(queue_write)
                os.close(read_fd)
                for child in children:
                    os.close(child.read_fd)
                _serve(queue_read, record, work, report, write_fd, previous)
            finally:
                os._exit(1)
        os.close(write_fd)
        children.append(_Child(pid, read_fd))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _serve(queue_read: int, record: struct.Struct, work, report, write_fd: int, mask) -> None:
    """Work through the records from the queue, stopping between files on SIGINT or SIGTERM."""
    stop: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        # A signal the main process ignores (SIGINT in a job started with `&` from a script)
        # stays ignored here, so that it cannot stop these processes while the main one goes on.
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, lambda number, frame: stop.append(number))

    def stopping() -> bool:
        return bool(stop)

    parent = os.getppid()
    _stop_with_parent()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    error_text = None
    try:
        if os.getppid() != parent:
            stop.append(signal.SIGTERM)
        drained = False
        read_bytes = batch_size(record) * record.size
        while not stop:
            data = os.read(queue_read, read_bytes)
            if not data:
                drained = True
                break
            while len(data) % record.size:  # never expected: writes are atomic
                more = os.read(queue_read, record.size - len(data) % record.size)
                if not more:
                    raise EOFError("the queue ended inside a record")
                data += more
            work(list(record.iter_unpack(data)), stopping)
        if not drained:
            name = signal.Signals(stop[0]).name
            error_text = f"stopped by {name}; the files it had taken from the queue are untouched"
    except BaseException as error:  # noqa: BLE001 - sent to the main process, which logs it
        error_text = f"{type(error).__name__}: {error}"
    try:
        for handler in logging.getLogger().handlers:
            handler.flush()
        write_all(write_fd, pickle.dumps((report(), error_text), pickle.HIGHEST_PROTOCOL))
    finally:
        os._exit(0 if error_text is None else 1)


def _stop_with_parent() -> None:
    """Ask the kernel for SIGTERM when the main process dies, so no deletion outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # without it, a process still stops once the queue is empty


def _stop(children: list[_Child]) -> None:
    for child in children:
        if child.status is None:
            try:
                os.kill(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _collect(children: list[_Child], batch: int) -> tuple[list[object], list[str]]:
    """Read each process's report to the end and reap it.

    `batch` is the largest number of records a process takes at a time, which the message about
    a process that died names. Safe to call again after an interrupt: what was read so far stays
    with each process.
    """
    for child in children:
        while child.read_fd >= 0:
            _read_report(child)
        if child.status is None:
            try:
                child.status = os.waitpid(child.pid, 0)[1]
            except ChildProcessError:
                child.status = 0  # reaped by a call that an interrupt cut short
    reports: list[object] = []
    lost: list[str] = []
    for child in children:
        received = _unpickle(child.data)
        if received is not None:
            report, error_text = received
            reports.append(report)
            if error_text is not None:
                lost.append(f"deleting process {child.pid} stopped early: {error_text}")
            continue
        status = child.status
        if os.WIFSIGNALED(status):
            ending = f"was killed by signal {os.WTERMSIG(status)}"
        else:
            ending = f"exited with status {os.waitstatus_to_exitcode(status)}"
        lost.append(
            f"deleting process {child.pid} {ending} before it reported: its deletions are missing "
            f"from the counts, and those of its last batch (up to {batch} files) may lack a log "
            "line. Files it had hidden get their names back in the next pass, and files it had "
            "not reached are untouched"
        )
    return reports, lost


def _read_report(child: _Child) -> None:
    """Read what is there of a process's report; close its pipe at the end of the report."""
    chunk = os.read(child.read_fd, 1 << 20)
    if chunk:
        child.data += chunk
    else:
        read_end, child.read_fd = child.read_fd, -1
        os.close(read_end)


def _unpickle(data: bytearray):
    """Return the (report, error) pair a process sent, or None if it died before sending it all."""
    try:
        return pickle.loads(data)
    except (pickle.UnpicklingError, EOFError, ValueError):
        return None
