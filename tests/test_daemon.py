"""The daemon as a real process with the real watchdog observer: events, folders, signals, logs."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, Samples, run_watcher, save_atomically, wait_until, write_file

RUN = "20251027_110846"
LOCK = ".ckpt-watcher.lock"


def ck(step: int, seed: int = 42) -> str:
    return f"model_v2_step{step}_{RUN}_s{seed}.pt"


def checkpoints(folder: Path) -> set[str]:
    return {name for name in os.listdir(folder) if name.startswith("model_v2_step")}


def steps_left(folder: Path) -> list[int]:
    return sorted(int(name.split("_")[2][len("step") :]) for name in checkpoints(folder))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoints"
    path.mkdir()
    return path


def test_startup_pass_then_events(folder: Path, samples: Samples, start_watcher) -> None:
    for step in (1, 2, 3, 4):
        write_file(folder / ck(step), samples.valid)
    watcher = start_watcher(str(folder))

    assert wait_until(lambda: steps_left(folder) == [3, 4])
    save_atomically(folder / ck(5), samples.valid)
    assert wait_until(lambda: steps_left(folder) == [4, 5])
    write_file(folder / ck(6), samples.valid)  # in place, as torch.save does
    assert wait_until(lambda: steps_left(folder) == [5, 6])

    assert watcher.stop() == 0
    assert "with the inotify observer" in watcher.log


def test_slow_writer_never_costs_a_valid_checkpoint(
    folder: Path, samples: Samples, start_watcher
) -> None:
    for step in (1, 2):
        write_file(folder / ck(step), samples.valid)
    watcher = start_watcher(str(folder))
    assert watcher.wait_for_log("pass done")

    data = samples.valid  # one real file, written 64 bytes at a time
    with open(folder / ck(3), "wb") as file:
        for start in range(0, len(data), 64):
            assert steps_left(folder) == [1, 2, 3], "a valid checkpoint was pruned mid-write"
            file.write(data[start : start + 64])
            file.flush()
            time.sleep(0.002)
    assert wait_until(lambda: steps_left(folder) == [2, 3])
    assert watcher.stop() == 0


def test_burst_of_saves_converges(folder: Path, samples: Samples, start_watcher) -> None:
    watcher = start_watcher(str(folder), "--keep-every", "100")
    assert watcher.wait_for_log("pass done")

    for step in range(1, 501):
        save_atomically(folder / ck(step), samples.valid)

    expected = [100, 200, 300, 400, 498, 499, 500]  # 500 is a milestone and takes no place
    assert wait_until(lambda: steps_left(folder) == expected, timeout=30), steps_left(folder)
    passes = watcher.log.count("pass done")
    assert passes < 500, f"{passes} passes for 500 saves: events were not coalesced"
    assert watcher.stop() == 0


def test_moved_in_from_another_folder(
    folder: Path, tmp_path: Path, samples: Samples, start_watcher
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    for step in (1, 2, 3):
        write_file(staging / ck(step), samples.valid)
    watcher = start_watcher(str(folder))
    assert watcher.wait_for_log("pass done")

    for step in (1, 2, 3):
        os.rename(staging / ck(step), folder / ck(step))

    assert wait_until(lambda: steps_left(folder) == [2, 3])
    assert watcher.stop() == 0


def test_folder_created_later(tmp_path: Path, samples: Samples, start_watcher) -> None:
    folder = tmp_path / "later"
    watcher = start_watcher(str(folder))
    assert watcher.wait_for_log("waiting for it to appear")

    folder.mkdir()
    for step in (1, 2, 3):
        write_file(folder / ck(step), samples.valid)

    assert wait_until(lambda: steps_left(folder) == [2, 3])
    assert watcher.log.count("waiting for it to appear") == 1
    assert watcher.stop() == 0


def _main_thread_wakeups(pid: int) -> int:
    """Return how often the process's main thread has gone to sleep and woken up so far."""
    status = Path(f"/proc/{pid}/task/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("voluntary_ctxt_switches"))
    return int(line.split()[1])


def test_missing_folder_waits_asleep(tmp_path: Path, samples: Samples, start_watcher) -> None:
    """A daemon waiting for a missing folder sleeps until a folder on the way to it appears."""
    folder = tmp_path / "a" / "b" / "checkpoints"
    watcher = start_watcher(str(folder), "--keep-last", "1", "-v")
    assert watcher.wait_for_log("waiting for it to appear")
    assert watcher.wait_for_log(f"waiting for 'a' to appear in {tmp_path}")
    before = _main_thread_wakeups(watcher.process.pid)
    time.sleep(3)
    wakeups = _main_thread_wakeups(watcher.process.pid) - before

    (tmp_path / "a").mkdir()
    assert watcher.wait_for_log(f"waiting for 'b' to appear in {tmp_path / 'a'}", timeout=5)
    folder.mkdir(parents=True)
    assert watcher.wait_for_log("watching", timeout=5)
    for step in (1, 2):
        write_file(folder / ck(step), samples.valid)

    assert wakeups <= 2  # a loop polling every 0.1 s wakes about 30 times in 3 s
    assert wait_until(lambda: steps_left(folder) == [2], timeout=5)
    assert watcher.stop() == 0


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_folder_through_dangling_link(
    tmp_path: Path, samples: Samples, start_watcher, observer: str
) -> None:
    """DIR as a link to a folder not made yet: the folder is watched once it is made."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "later")
    options = ["--polling"] if observer == "polling" else []
    watcher = start_watcher(str(link), "--keep-last", "1", *options)
    assert watcher.wait_for_log("waiting for it to appear")

    (tmp_path / "later").mkdir()
    assert watcher.wait_for_log("watching", timeout=5)
    for step in (1, 2):
        write_file(tmp_path / "later" / ck(step), samples.valid)

    assert wait_until(lambda: steps_left(tmp_path / "later") == [2], timeout=5)
    assert watcher.stop() == 0


def test_file_replaced_by_folder(tmp_path: Path, samples: Samples, start_watcher) -> None:
    """DIR names a file at first: the error is logged, and the folder made in its place is
    watched within seconds."""
    path = tmp_path / "checkpoints"
    path.write_text("not a folder")
    watcher = start_watcher(str(path), "--keep-last", "1")
    assert watcher.wait_for_log("is not a folder")
    assert "trying again when it changes" in watcher.log

    path.unlink()
    path.mkdir()
    assert watcher.wait_for_log("watching", timeout=5)
    for step in (1, 2):
        write_file(path / ck(step), samples.valid)

    assert wait_until(lambda: steps_left(path) == [2], timeout=5)
    assert watcher.stop() == 0


def test_polled_batch_keeps_newest(folder: Path, samples: Samples, start_watcher) -> None:
    """Saves that one poll finds together count as one arrival: the newest by step stays, and no
    older one is kept as a rolled-back save."""
    watcher = start_watcher(str(folder), "--polling", "--keep-last", "1")
    assert watcher.wait_for_log("pass done")

    step = 0
    for _round in range(5):
        for _ in range(2):  # both within one poll of 1 s, reported in either order
            step += 1
            save_atomically(folder / ck(step), samples.valid)
        assert wait_until(lambda newest=step: steps_left(folder) == [newest], 10), steps_left(
            folder
        )

    assert "rolled back" not in watcher.log
    assert watcher.stop() == 0


def test_poll_ends_with_marker(folder: Path) -> None:
    """The polling observer follows the events of each poll that found changes with one marker,
    and sends no marker for a poll that found none."""
    from watchdog.events import FileSystemEventHandler

    from watcher import daemon

    received: list[tuple[str, str]] = []

    class Recorder(FileSystemEventHandler):
        def dispatch(self, event) -> None:
            received.append((event.event_type, os.path.basename(event.src_path)))

    observer = daemon._polling_observer()
    observer.schedule(Recorder(), str(folder), recursive=False)
    observer.start()
    try:
        time.sleep(0.2)
        for step in range(1, 6):
            (folder / ck(step)).write_bytes(b"x")
        assert wait_until(lambda: ("poll_done", folder.name) in received, 5)
        time.sleep(2.5)  # two more polls that find nothing
    finally:
        observer.stop()
        observer.join(5)

    created = [name for kind, name in received if kind == "created"]
    markers = [index for index, (kind, _name) in enumerate(received) if kind == "poll_done"]
    assert sorted(created) == sorted(ck(step) for step in range(1, 6))
    assert markers == [len(received) - 1]


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_folder_through_symlink(
    tmp_path: Path, samples: Samples, start_watcher, observer: str
) -> None:
    """A folder given as a symbolic link is watched: each save prunes at once, not at the next
    rescan."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    options = ["--polling"] if observer == "polling" else []
    watcher = start_watcher(str(link), "--keep-last", "1", *options)
    assert watcher.wait_for_log("pass done")

    for step in (1, 2, 3):
        save_atomically(real / ck(step), samples.valid)
        assert wait_until(lambda step=step: steps_left(real) == [step], 10), steps_left(real)

    assert f"watching {link}, which is {real}, with the {observer} observer" in watcher.log
    assert watcher.stop() == 0


def test_symlink_pointed_elsewhere(tmp_path: Path, samples: Samples, start_watcher) -> None:
    """Pointing the link at another folder moves the watch there."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    link = tmp_path / "link"
    link.symlink_to(first)
    watcher = start_watcher(str(link), "--keep-last", "1")
    assert watcher.wait_for_log("pass done")

    swap = tmp_path / "swap"
    swap.symlink_to(second)
    os.replace(swap, link)
    assert watcher.wait_for_log("was replaced", 25)
    assert watcher.wait_for_log(f"which is {second}")
    for step in (1, 2):
        save_atomically(second / ck(step), samples.valid)
    save_atomically(first / ck(5), samples.valid)
    save_atomically(first / ck(6), samples.valid)

    assert wait_until(lambda: steps_left(second) == [2], 10), steps_left(second)
    assert steps_left(first) == [5, 6]
    assert watcher.stop() == 0


def test_folder_deleted_and_recreated(folder: Path, samples: Samples, start_watcher) -> None:
    watcher = start_watcher(str(folder))
    assert watcher.wait_for_log("pass done")

    shutil.rmtree(folder)
    # Noticed from the deletion of the lock file, well before the next timed folder check.
    assert watcher.wait_for_log("was deleted or moved away", 5)
    folder.mkdir()
    for step in (7, 8, 9):
        save_atomically(folder / ck(step), samples.valid)

    assert wait_until(lambda: steps_left(folder) == [8, 9])
    assert (folder / LOCK).exists()
    assert watcher.process.poll() is None
    assert watcher.stop() == 0


def test_folder_renamed_away(folder: Path, tmp_path: Path, samples: Samples, start_watcher) -> None:
    watcher = start_watcher(str(folder))
    assert watcher.wait_for_log("pass done")

    os.rename(folder, tmp_path / "renamed")
    folder.mkdir()
    for step in (1, 2, 3):
        write_file(folder / ck(step), samples.valid)

    # No event reports the rename: the folder check notices it, at most 10 s later.
    assert wait_until(lambda: steps_left(folder) == [2, 3], 25)
    assert watcher.stop() == 0


def test_deleted_lock_file_is_recreated(folder: Path, start_watcher) -> None:
    """A lock file deleted by hand is made and locked again, so a second watcher is still
    refused."""
    watcher = start_watcher(str(folder))
    assert watcher.wait_for_log("pass done")

    (folder / LOCK).unlink()

    assert watcher.wait_for_log("was deleted or replaced; locking the folder again", 5)
    assert wait_until(lambda: (folder / LOCK).exists())
    second = run_watcher(str(folder), "--once")
    assert second.returncode == 1, second.stderr[-2000:]
    assert watcher.process.poll() is None
    assert watcher.stop() == 0


def test_second_watcher_refused(folder: Path, start_watcher) -> None:
    first = start_watcher(str(folder))
    assert first.wait_for_log("pass done")

    second = start_watcher(str(folder))
    assert second.process.wait(15) == 1
    assert f"another watcher (process {first.process.pid})" in second.log
    assert str(folder) in second.log

    once = start_watcher(str(folder), "--once")
    assert once.process.wait(15) == 1
    assert f"process {first.process.pid}" in once.log
    assert first.process.poll() is None
    assert first.stop() == 0


_WAKER_UNDER_SIGNALS = """
import signal, sys, time
from watcher.daemon import _Waker
waker = _Waker()
count = 0
def handler(signum, frame):
    global count
    count += 1
    waker.set()
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
deadline = time.monotonic() + 2
while time.monotonic() < deadline:
    waker.wait(0)
    waker.clear()
signal.setitimer(signal.ITIMER_REAL, 0)
print(count)
"""


def test_waker_set_from_signal_handler() -> None:
    """A signal handler that wakes the loop while the loop waits and clears, thousands of times.

    With threading.Event in place of _Waker this run stops with an error or never ends, because
    a handler can run while its own thread holds the event's lock.
    """
    result = subprocess.run(
        [sys.executable, "-c", _WAKER_UNDER_SIGNALS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) > 100


def test_stop_signal_while_logging(folder: Path, samples: Samples, start_watcher) -> None:
    """SIGTERM that lands during a large pass, while the daemon writes its log lines, stops it
    after the pass, and the daemon logs the signal."""
    for round_number in range(6):
        for step in range(1, 301):
            write_file(folder / ck(step, seed=round_number), samples.valid)
        watcher = start_watcher(str(folder), "--keep-last", "1", "-v")
        assert watcher.wait_for_log("pruned", timeout=30), watcher.log[-2000:]
        time.sleep(0.002 * round_number)  # each round lands elsewhere in the pass's log lines
        status = watcher.stop(signal.SIGTERM, timeout=20)
        assert status == 0, watcher.log[-2000:]
        assert "received SIGTERM: stopping" in watcher.log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_exits_zero(folder: Path, start_watcher, signum: int) -> None:
    watcher = start_watcher(str(folder))
    assert watcher.wait_for_log("pass done")

    assert watcher.stop(signum) == 0
    assert f"received {signal.Signals(signum).name}" in watcher.log
    assert "stopped" in watcher.log


def test_sighup_reload(folder: Path, tmp_path: Path, samples: Samples, start_watcher) -> None:
    config = tmp_path / "policy.yaml"
    config.write_text(f"directory: {folder}\nkeep_last: 3\n")
    for step in (1, 2, 3, 4):
        write_file(folder / ck(step), samples.valid)
    watcher = start_watcher("--config", str(config))
    assert wait_until(lambda: steps_left(folder) == [2, 3, 4])

    config.write_text(f"directory: {folder}\nkeep_last: 1\n")
    watcher.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: steps_left(folder) == [4])
    assert "config reloaded" in watcher.log

    config.write_text("keep_last: [oops\n")
    watcher.process.send_signal(signal.SIGHUP)
    assert watcher.wait_for_log("config reload failed, keeping the current policy")
    save_atomically(folder / ck(5), samples.valid)
    assert wait_until(lambda: steps_left(folder) == [5])
    assert watcher.process.poll() is None
    assert watcher.stop() == 0


def test_polling_mode(folder: Path, samples: Samples, start_watcher) -> None:
    watcher = start_watcher(str(folder), "--polling")
    assert watcher.wait_for_log("with the polling observer")

    for step in (1, 2, 3):
        save_atomically(folder / ck(step), samples.valid)

    assert wait_until(lambda: steps_left(folder) == [2, 3])
    assert watcher.stop() == 0


def test_json_logs(folder: Path, samples: Samples, start_watcher) -> None:
    for step in (1, 2, 3):
        write_file(folder / ck(step), samples.valid)
    watcher = start_watcher(str(folder), "--log-format", "json")
    assert wait_until(lambda: steps_left(folder) == [2, 3])
    assert watcher.stop() == 0

    records = [json.loads(line) for line in watcher.log.splitlines()]
    assert records, "no log lines"
    assert all({"time", "level", "logger", "message"} <= set(record) for record in records)
    pruned = [record for record in records if record["message"].startswith("pruned")]
    assert len(pruned) == 1
    assert ck(1) in pruned[0]["message"]
    assert pruned[0]["event"] == "pruned"
    assert pruned[0]["file"] == ck(1)
    assert pruned[0]["step"] == 1
    assert pruned[0]["series"] == f"model_v2_step_{RUN}_s42.pt"
    assert pruned[0]["bytes"] == len(samples.valid)
    assert pruned[0]["reason"].startswith("older than the newest 2 valid checkpoints")


def test_json_log_fields_of_dry_run(folder: Path, samples: Samples, start_watcher) -> None:
    """A daemon's dry run logs each file it would prune with JSON fields, and no invalid one."""
    for step in (1, 2, 3):
        write_file(folder / ck(step), samples.valid)
    write_file(folder / ck(4), samples.valid[:100])
    watcher = start_watcher(str(folder), "--log-format", "json", "--dry-run")
    assert watcher.wait_for_log("would prune")
    assert watcher.stop() == 0

    records = [json.loads(line) for line in watcher.log.splitlines()]
    would = [record for record in records if record.get("event") == "would_prune"]
    assert [record["file"] for record in would] == [ck(1)]
    assert would[0]["step"] == 1
    assert would[0]["message"].startswith("would prune")
    assert steps_left(folder) == [1, 2, 3, 4]


def test_sd_notify_messages(folder: Path, tmp_path: Path, start_watcher) -> None:
    address = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(10)
    try:
        watcher = start_watcher(
            str(folder), env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
        )
        # The first pass may ping before it reports READY.
        messages = [server.recv(4096).decode()]
        while not messages[-1].startswith("READY=1"):
            messages.append(server.recv(4096).decode())
        assert messages[-1].startswith("READY=1\nSTATUS=pass done")
        assert set(messages[:-1]) <= {"WATCHDOG=1"}
        assert server.recv(4096).decode() == "WATCHDOG=1"

        watcher.process.send_signal(signal.SIGTERM)
        rest = []
        while "STOPPING=1" not in rest:
            rest.append(server.recv(4096).decode())
        assert watcher.process.wait(15) == 0
    finally:
        server.close()


@pytest.mark.parametrize("keep_last", [2, 100_000], ids=["deleting", "checking"])
def test_watchdog_pings_during_long_pass(
    folder: Path, tmp_path: Path, samples: Samples, start_watcher, keep_last: int
) -> None:
    """A first pass that outlasts the watchdog interval must keep pinging, or the service
    manager kills the watcher in the middle of it. With a large keep_last the pass checks
    every file instead of deleting it."""
    for step in range(1, 30_001):
        write_file(folder / ck(step), samples.valid)
    address = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(60)
    try:
        started = time.monotonic()
        watcher = start_watcher(
            str(folder),
            "--keep-last",
            str(keep_last),
            env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"},
        )
        arrivals = [(started, "")]
        while not arrivals[-1][1].startswith("READY=1"):
            message = server.recv(4096).decode()
            arrivals.append((time.monotonic(), message))
    finally:
        server.close()

    pass_seconds = arrivals[-1][0] - started
    assert pass_seconds > 1.5, f"the first pass took {pass_seconds:.2f} s: too short to test"
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(arrivals)]
    assert max(gaps) < 1.0, gaps
    assert sum(message == "WATCHDOG=1" for _, message in arrivals) >= 3
    assert len(steps_left(folder)) == min(keep_last, 30_000)
    assert watcher.stop() == 0


def test_dead_observer_is_replaced(folder: Path, samples: Samples, start_watcher) -> None:
    watcher = start_watcher(str(folder), env={"CKPT_WATCHER_TEST_FAULT": "handler"})
    assert watcher.wait_for_log("pass done")

    save_atomically(folder / ck(1), samples.valid)  # this event kills the dispatch thread
    # No event reaches the daemon any more, so the folder check finds it, at most 10 s later.
    assert watcher.wait_for_log("event dispatch thread died", 25)
    assert watcher.wait_for_log("restarted the inotify observer")
    for step in (2, 3):
        save_atomically(folder / ck(step), samples.valid)

    assert wait_until(lambda: steps_left(folder) == [2, 3])
    assert watcher.stop() == 0


def test_link_refresh_keeps_target(folder: Path, samples: Samples, start_watcher) -> None:
    """Refreshing best.pt by delete and create must never expose its target to a pass."""
    for step in (1, 2, 3):
        write_file(folder / ck(step), samples.valid)
    link = folder / "best.pt"
    link.symlink_to(ck(1))
    watcher = start_watcher(str(folder), "--keep-last", "1")
    assert wait_until(lambda: steps_left(folder) == [1, 3])

    for _ in range(300):
        os.remove(link)
        time.sleep(0.001)
        os.symlink(ck(1), link)
        time.sleep(0.001)
        assert (folder / ck(1)).exists(), "the target of best.pt was pruned during a refresh"
    assert watcher.stop() == 0
    assert "pruned 'model_v2_step1_" not in watcher.log


def test_rollback_keeps_new_checkpoint(folder: Path, samples: Samples, start_watcher) -> None:
    """A run restarted from an earlier step keeps its newest save despite stale higher steps."""
    for step in (900, 1000):
        write_file(folder / ck(step), samples.valid)
    watcher = start_watcher(str(folder), "--keep-last", "2")
    assert watcher.wait_for_log("pass done")

    save_atomically(folder / ck(20), samples.valid)
    assert watcher.wait_for_log("restarted or rolled back")
    assert steps_left(folder) == [20, 900, 1000]
    save_atomically(folder / ck(40), samples.valid)
    assert wait_until(lambda: steps_left(folder) == [40, 900, 1000])

    save_atomically(folder / ck(1100), samples.valid)
    assert wait_until(lambda: steps_left(folder) == [1000, 1100])
    assert watcher.stop() == 0


def test_relative_folder_survives_cwd_removal(
    tmp_path: Path, samples: Samples, start_watcher
) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    watcher = start_watcher(
        "checkpoints",
        wrapper=[sys.executable, "-m", "watcher", "checkpoints"],
        cwd=run,
        env={"PYTHONPATH": str(REPO)},
    )
    assert watcher.wait_for_log("pass done")

    shutil.rmtree(run)
    (run / "checkpoints").mkdir(parents=True)
    for step in (1, 2, 3):
        save_atomically(run / "checkpoints" / ck(step), samples.valid)

    assert wait_until(lambda: steps_left(run / "checkpoints") == [2, 3])
    assert watcher.process.poll() is None
    assert watcher.stop() == 0


def test_in_place_write_does_not_flood(folder: Path, samples: Samples, start_watcher) -> None:
    watcher = start_watcher(str(folder), "-v")
    assert watcher.wait_for_log("pass done")

    data = samples.valid * 40  # 40 copies: invalid as a whole, which is fine for this test
    with open(folder / ck(1), "wb") as file:
        for start in range(0, len(data), len(data) // 150):
            file.write(data[start : start + len(data) // 150])
            file.flush()
            time.sleep(0.01)
    time.sleep(1.5)

    assert watcher.stop() == 0
    passes = watcher.log.count("pass done")
    assert passes <= 8, f"{passes} passes for one in-place write of about 2 s"
    assert "invalid, kept and not counted" not in watcher.log


def test_dry_run_daemon_reports_once(folder: Path, samples: Samples, start_watcher) -> None:
    for step in (1, 2, 3):
        write_file(folder / ck(step), samples.valid)
    watcher = start_watcher(str(folder), "--dry-run")
    assert watcher.wait_for_log("would prune")

    for step in (4, 5):
        save_atomically(folder / ck(step), samples.valid)
    assert watcher.wait_for_log("5 checkpoints")

    assert watcher.stop() == 0
    assert watcher.log.count(f"would prune '{ck(1)}'") == 1
    assert steps_left(folder) == [1, 2, 3, 4, 5]


def test_periodic_rescan_without_events(folder: Path, start_watcher) -> None:
    watcher = start_watcher(str(folder), "--rescan-interval", "1")
    assert watcher.wait_for_log("pass done")

    assert watcher.wait_for_log("pass done", count=4, timeout=10)
    assert watcher.stop() == 0
