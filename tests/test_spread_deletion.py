"""A large one-shot pass deletes from forked processes: the outcome, the log and every way of
stopping it must be those of a pass that deletes from one process."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, Samples, run_watcher, wait_until, write_file
from test_large_pass import MILESTONE_EVERY, build, ck

import watcher.deleters
import watcher.prune
from watcher.config import Policy
from watcher.deleters import MIN_FILES, process_count
from watcher.passes import Pruner, open_folder
from watcher.prune import PRUNING_PREFIX

pytestmark = pytest.mark.skipif(
    process_count() < 2, reason="one core: a one-shot pass deletes from one process"
)

SPREAD_COUNT = 2 * MIN_FILES + 100
"""Enough files for a plan that prunes more than MIN_FILES after invalid files and milestones."""

BIG_COUNT = 20_000
"""A folder whose pass lasts long enough to stop it part way."""

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \S+: ")
SPREAD_LINE = "deleting the valid ones from"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "ckpts"
    path.mkdir()
    return path


_STARTED: list[int] = []


@pytest.fixture(autouse=True)
def _kill_leftovers():
    """Kill the process group of every pass a test started, so a hung pass cannot outlive it."""
    yield
    while _STARTED:
        try:
            os.killpg(_STARTED.pop(), signal.SIGKILL)
        except ProcessLookupError:
            pass


def visible(folder: Path) -> set[str]:
    """Return the names in the folder, without the lock file and without hidden names."""
    return {
        name
        for name in os.listdir(folder)
        if name != ".ckpt-watcher.lock" and not name.startswith(PRUNING_PREFIX)
    }


def hidden(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(PRUNING_PREFIX)]


def fill(folder: Path, samples: Samples, count: int) -> None:
    """Write `count` valid checkpoints of one series, steps 1..count."""
    for step in range(1, count + 1):
        write_file(folder / ck(step), samples.valid)


def children_of(pid: int) -> list[int]:
    """Return the process ids whose parent is `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Return whether `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def start_big_pass(
    folder: Path,
    samples: Samples,
    log_path: Path,
    deleted: int = 20,
    count: int = BIG_COUNT,
    ignore_sigint: bool = False,
):
    """Fill the folder with `count` files and start `--once` in its own session, as a shell
    starts a foreground job. Return the process and the ids of its deleting processes, once
    they have logged `deleted` deletions. `ignore_sigint` starts it with SIGINT ignored, as a
    script starts a job with `&`."""
    fill(folder, samples, count)
    command = [sys.executable, "-m", "watcher", str(folder), "--once", "--keep-last", "2"]
    if ignore_sigint:
        command = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    _STARTED.append(process.pid)
    assert wait_until(lambda: log_path.read_text().count("pruned 'model") >= deleted, 30), (
        log_path.read_text()[-2000:]
    )
    children = children_of(process.pid)
    assert children, "no deleting process found"
    return process, children


def finish_and_compare(folder: Path, count: int = BIG_COUNT) -> None:
    """A second pass must leave exactly the newest 2, with no hidden name left."""
    result = run_watcher(str(folder), "--once", "--keep-last", "2", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert visible(folder) == {ck(count - 1), ck(count)}


def test_spread_pass_keeps_what_the_rules_keep(folder: Path, samples: Samples) -> None:
    expected = build(folder, samples, SPREAD_COUNT)
    entries = SPREAD_COUNT + 1
    pruned = entries + 1 - len(expected)
    assert pruned >= MIN_FILES

    result = run_watcher(str(folder), "--once", "--keep-every", str(MILESTONE_EVERY))

    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{SPREAD_LINE} {process_count()} processes" in result.stderr
    assert visible(folder) == expected
    assert not hidden(folder)
    assert f"pruned {pruned}," in result.stderr
    invalid = SPREAD_COUNT // 7 + 1
    assert f"{invalid} invalid kept" in result.stderr
    deleted = re.findall(r"pruned '(model_v2_step\d+_[^']+)'", result.stderr)
    assert len(deleted) == len(set(deleted)) == pruned
    assert not set(deleted) & expected
    # Lines from several processes must never mix inside one line.
    for line in result.stderr.splitlines():
        assert LOG_LINE.match(line), line


def test_spread_pass_writes_whole_json_lines(folder: Path, samples: Samples) -> None:
    fill(folder, samples, SPREAD_COUNT)

    result = run_watcher(str(folder), "--once", "--keep-last", "2", "--log-format", "json")

    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stderr.splitlines()]
    messages = [record["message"] for record in records]
    assert sum(message.startswith("pruned 'model") for message in messages) == SPREAD_COUNT - 2
    assert any(SPREAD_LINE in message for message in messages)
    assert visible(folder) == {ck(SPREAD_COUNT - 1), ck(SPREAD_COUNT)}


def require_no_threads() -> None:
    """Forking from the test process is only allowed while it runs no other thread."""
    if threading.active_count() != 1:
        pytest.skip(f"{threading.active_count()} threads in the test process: it must not fork")


def test_same_outcome_as_one_process(tmp_path: Path, samples: Samples) -> None:
    """The same folder, pruned from one process and from several, ends the same."""
    require_no_threads()
    outcomes = []
    for processes in (1, process_count()):
        folder = tmp_path / f"by{processes}"
        folder.mkdir()
        expected = build(folder, samples, SPREAD_COUNT)
        fd = open_folder(folder)
        try:
            summary = Pruner(Policy(directory=folder, keep_every=100), processes=processes).run(fd)
        finally:
            os.close(fd)
        assert visible(folder) == expected
        outcomes.append((summary.checkpoints, summary.kept, summary.pruned, summary.invalid))
        outcomes[-1] += (summary.bytes_freed, summary.failed, summary.skipped)
    assert outcomes[0] == outcomes[1]


def test_ctrl_c_stops_every_process(folder: Path, samples: Samples, tmp_path: Path) -> None:
    log_path = tmp_path / "once.log"
    process, children = start_big_pass(folder, samples, log_path)

    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    status = process.wait(30)

    log = log_path.read_text()
    assert status == 130, log[-2000:]
    assert "interrupted" in log
    assert not any(alive(pid) for pid in children)
    assert not hidden(folder)
    left = visible(folder)
    assert {ck(BIG_COUNT - 1), ck(BIG_COUNT)} <= left
    assert len(left) > 2, "the pass ended before the interrupt; nothing was tested"
    # Every file a log line names is gone, and every file still present is unnamed.
    deleted = set(re.findall(r"pruned '(model_v2_step\d+_[^']+)'", log))
    assert not deleted & left
    assert len(deleted) + len(left) == BIG_COUNT
    finish_and_compare(folder)


def test_sigint_to_the_main_process_alone(folder: Path, samples: Samples, tmp_path: Path) -> None:
    """`kill -INT` names one process; the deleting ones must stop too."""
    log_path = tmp_path / "once.log"
    process, children = start_big_pass(folder, samples, log_path)

    process.send_signal(signal.SIGINT)
    status = process.wait(30)

    assert status == 130, log_path.read_text()[-2000:]
    assert not any(alive(pid) for pid in children)
    assert not hidden(folder)
    assert len(visible(folder)) > 2
    finish_and_compare(folder)


def test_killed_main_process_stops_the_others(
    folder: Path, samples: Samples, tmp_path: Path
) -> None:
    log_path = tmp_path / "once.log"
    process, children = start_big_pass(folder, samples, log_path)

    process.kill()
    process.wait(30)

    assert wait_until(lambda: not any(alive(pid) for pid in children), 10)
    assert not hidden(folder)
    left = visible(folder)
    assert len(left) > 2
    finish_and_compare(folder)


@pytest.mark.parametrize(
    ("signum", "message"),
    [
        pytest.param(signal.SIGKILL, "was killed by signal 9", id="SIGKILL"),
        pytest.param(signal.SIGTERM, "stopped early: stopped by SIGTERM", id="SIGTERM"),
    ],
)
def test_one_deleting_process_stopped(
    folder: Path, samples: Samples, tmp_path: Path, signum: int, message: str
) -> None:
    """One deleting process ends while the others go on: the pass must report it."""
    log_path = tmp_path / "once.log"
    process, children = start_big_pass(folder, samples, log_path)

    os.kill(children[0], signum)
    status = process.wait(120)

    log = log_path.read_text()
    assert status == 1, log[-2000:]
    assert f"deleting process {children[0]} {message}" in log
    assert "1 deleting process stopped early" in log.splitlines()[-1]
    # Only the files the stopped process had taken from the queue may be left, visible or
    # hidden, besides the newest 2. SIGTERM lets it put back the files it hid, so none is hidden.
    queued = watcher.deleters.batch_size(watcher.prune._RECORD)
    assert len(visible(folder)) + len(hidden(folder)) <= 2 + queued
    if signum == signal.SIGTERM:
        assert not hidden(folder)
    finish_and_compare(folder)


def test_failed_fork_falls_back_to_one_process(
    folder: Path, samples: Samples, monkeypatch, caplog
) -> None:
    """When the second fork fails, the first process deletes nothing and this one does it all."""
    require_no_threads()
    expected = build(folder, samples, SPREAD_COUNT)
    real_fork = os.fork
    forks = []

    def fork_once() -> int:
        if forks:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        forks.append(1)
        return real_fork()

    monkeypatch.setattr(watcher.deleters.os, "fork", fork_once)
    fd = open_folder(folder)
    try:
        with caplog.at_level(logging.INFO):
            summary = Pruner(Policy(directory=folder, keep_every=100), processes=3).run(fd)
    finally:
        os.close(fd)

    assert "cannot start a deleting process" in caplog.text
    assert "deleting from this process alone" in caplog.text
    assert visible(folder) == expected
    assert summary.failed == 0
    assert summary.pruned == SPREAD_COUNT + 2 - len(expected)


def test_daemon_never_forks(folder: Path, samples: Samples, start_watcher) -> None:
    """The daemon's observer runs threads, so its passes delete from its own process."""
    fill(folder, samples, SPREAD_COUNT)
    watcher_process = start_watcher(str(folder), "--keep-last", "2")
    assert watcher_process.wait_for_log("pass done", timeout=60), watcher_process.log[-2000:]
    time.sleep(0.2)
    assert SPREAD_LINE not in watcher_process.log
    assert visible(folder) == {ck(SPREAD_COUNT - 1), ck(SPREAD_COUNT)}
    assert watcher_process.stop() == 0


def test_all_deleting_processes_stopped(folder: Path, samples: Samples, tmp_path: Path) -> None:
    """Reports larger than a pipe's buffer, sent while the main process still fills the queue,
    must not leave both sides waiting on each other."""
    log_path = tmp_path / "once.log"
    # 6,000 deleted names make reports above 64 KiB, and the 34,000 files left fill the queue.
    process, children = start_big_pass(folder, samples, log_path, deleted=6000, count=40_000)

    for pid in children:
        os.kill(pid, signal.SIGTERM)
    status = process.wait(60)

    log = log_path.read_text()
    assert status == 1, log[-2000:]
    assert "no deleting process is left" in log
    assert log.count("stopped early: stopped by SIGTERM") == len(children)
    assert f"{len(children)} deleting processes stopped early" in log.splitlines()[-1]
    assert len(visible(folder)) > 2, "the pass ended before the signals; nothing was tested"
    assert not hidden(folder)
    finish_and_compare(folder, 40_000)


def test_ignored_sigint_stays_ignored(folder: Path, samples: Samples, tmp_path: Path) -> None:
    """A job started with SIGINT ignored must not lose its deleting processes to a SIGINT."""
    log_path = tmp_path / "once.log"
    process, _ = start_big_pass(folder, samples, log_path, ignore_sigint=True)

    os.killpg(process.pid, signal.SIGINT)
    status = process.wait(120)

    log = log_path.read_text()
    assert status == 0, log[-2000:]
    assert "stopped early" not in log
    assert visible(folder) == {ck(BIG_COUNT - 1), ck(BIG_COUNT)}


def test_closed_standard_streams(folder: Path, samples: Samples) -> None:
    """`>&-` and `2>&-` close stdout or stderr; a large pass must still run."""
    for closed in (1, 2):
        fill(folder, samples, SPREAD_COUNT)
        command = [sys.executable, "-m", "watcher", str(folder), "--once", "--keep-last", "2"]
        result = subprocess.run(
            ["sh", "-c", f'exec "$@" {closed}>&-', "sh", *command],
            check=False,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert visible(folder) == {ck(SPREAD_COUNT - 1), ck(SPREAD_COUNT)}


def test_fields_out_of_record_range(folder: Path, samples: Samples) -> None:
    """A step over 2**63 - 1 or an mtime after 2262 does not fit the record that a deleting
    process gets. The main process must delete such a file itself, with its log line."""
    fill(folder, samples, SPREAD_COUNT)
    huge = [2**64 + offset for offset in range(3)]
    for step in huge:
        write_file(folder / ck(step), samples.valid)
    late_ns = 2**63 + 10**18  # late in the year 2293
    os.utime(folder / ck(5), ns=(late_ns, late_ns))
    if os.stat(folder / ck(5)).st_mtime_ns != late_ns:
        pytest.skip("this file system cannot store an mtime after 2262")

    result = run_watcher(str(folder), "--once", "--keep-last", "2")

    assert result.returncode == 0, result.stderr[-2000:]
    assert SPREAD_LINE in result.stderr
    assert visible(folder) == {ck(huge[1]), ck(huge[2])}
    assert f"pruned {ck(huge[0])!r} (step {huge[0]}," in result.stderr
    assert f"pruned {ck(5)!r} (step 5," in result.stderr
    assert result.stderr.count(": pruned '") == SPREAD_COUNT + 1
