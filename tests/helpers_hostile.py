"""Helpers for the hostile-input tests: another uid, read-only mounts, immutable files, timed hooks.

Run as a script, this module is the name swapper used by the symlink race tests:
    python tests/helpers_hostile.py FOLDER NAME OUTSIDE_TARGET INSIDE_TARGET TEMPLATE SECONDS
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = "20251027_110846"
NOBODY = 65534


def ck(step: int, seed: int = 42) -> str:
    return f"model_v2_step{step}_{RUN}_s{seed}.pt"


@contextmanager
def public_temp_dir():
    """Yield a temp folder that every uid can traverse, unlike pytest's 0700 tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="ckpt-hostile-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# The venv's interpreter is a link into /root/.pyenv, and /root is mode 0700 on the test machine,
# so uid 65534 cannot exec it. The launcher therefore starts as root, imports everything the
# watcher needs, drops to uid and gid 65534 with no supplementary groups, checks that no
# capability is left, and only then runs the command line. Every file operation of the watcher
# runs unprivileged.
_UNPRIVILEGED_LAUNCHER = """
import os, sys
import watcher.cli, watcher.daemon, watcher.logs, json
os.setgroups([])
os.setgid({uid})
os.setuid({uid})
with open("/proc/self/status") as status:
    effective = [line for line in status if line.startswith("CapEff")][0].split()[1]
if int(effective, 16) != 0:
    sys.exit("capabilities left after dropping to uid {uid}: " + effective)
sys.exit(watcher.cli.main(sys.argv[1:]))
"""


def run_unprivileged(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the watcher's command line as uid and gid 65534 (nobody), without capabilities."""
    return subprocess.run(
        [sys.executable, "-c", _UNPRIVILEGED_LAUNCHER.format(uid=NOBODY), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def read_only_bind(path: Path):
    """Make path a read-only bind mount of itself for the duration; always unmount after."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True)
    try:
        subprocess.run(
            ["mount", "-o", "remount,ro,bind", str(path)], check=True, capture_output=True
        )
        yield path
    finally:
        unmount(path)


def unmount(path: Path) -> None:
    result = subprocess.run(["umount", str(path)], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        # A watcher still holding the folder open keeps the mount busy: detach it lazily.
        subprocess.run(["umount", "-l", str(path)], check=True)


def can_bind_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    with public_temp_dir() as path:
        try:
            with read_only_bind(path):
                return True
        except (subprocess.CalledProcessError, OSError):
            return False


@contextmanager
def immutable(path: Path):
    """Set the immutable attribute on path (not even root may delete it); clear it after."""
    subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True, capture_output=True)


def can_set_immutable(folder: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        return False
    probe = folder / ".immutable-probe"
    probe.touch()
    try:
        with immutable(probe):
            return True
    except subprocess.CalledProcessError:
        return False
    finally:
        probe.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Acting while a real watcher is in the middle of a pass


@dataclass
class TimedRun:
    result: subprocess.CompletedProcess
    hook_during_check: bool
    """True when the watcher still had the slow file open after the hook returned, which proves
    that the hook ran after the scan and before any deletion of that pass."""


def open_by(pid: int, path: Path) -> bool:
    """Return whether process pid has path open."""
    target = str(path)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def run_during_check(
    args: list[str],
    slow_file: Path,
    hook: Callable[[], None],
    slow_file_after: Path | None = None,
    timeout: float = 30,
) -> TimedRun:
    """Run `python -m watcher ARGS`, call hook while it checks slow_file, and wait for the exit.

    The watcher checks every checkpoint before it plans or deletes anything, and checking
    slow_file (helpers_corpus.slow_checkpoint) takes a few hundred milliseconds. The hook
    therefore runs after the scan and before the first deletion, as long as the file is still
    open when the hook returns; TimedRun.hook_during_check records that. Give slow_file_after
    when the hook moves the slow file, as /proc then shows its new path.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "watcher", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    seen = False
    while process.poll() is None and time.monotonic() < deadline:
        if open_by(process.pid, slow_file):
            seen = True
            break
        time.sleep(0.0005)
    during = False
    if seen:
        hook()
        during = open_by(process.pid, slow_file_after or slow_file)
    stdout, stderr = process.communicate(timeout=timeout)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return TimedRun(result, during)


# ---------------------------------------------------------------------------
# The name swapper


def swap_names(
    folder: Path, name: str, outside: str, inside: str, template: Path, seconds: float
) -> dict:
    """Swap a regular file and symlinks in and out of folder/name as fast as possible.

    Each round moves the file at `name` aside, puts a symlink there (to `outside` or to
    `inside`, in turn), moves the link aside and puts the file back. A file gone when it is
    moved aside was pruned (allowed); a link gone was deleted by the watcher (counted).
    """
    held_file = folder / ".swap-file"
    held_links = {"out": folder / ".swap-out", "in": folder / ".swap-in"}
    targets = {"out": outside, "in": inside}
    data = template.read_bytes()
    for kind, link in held_links.items():
        os.symlink(targets[kind], link)
    counts = {"rounds": 0, "files_pruned": 0, "links_deleted": {"out": 0, "in": 0}}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        kind = "out" if counts["rounds"] % 2 == 0 else "in"
        try:
            os.rename(folder / name, held_file)
        except FileNotFoundError:
            counts["files_pruned"] += 1
            held_file.write_bytes(data)
        os.rename(held_links[kind], folder / name)
        try:
            os.rename(folder / name, held_links[kind])
        except FileNotFoundError:
            counts["links_deleted"][kind] += 1
            os.symlink(targets[kind], held_links[kind])
        os.rename(held_file, folder / name)
        counts["rounds"] += 1
    return counts


def start_swapper(
    folder: Path, name: str, outside: str, inside: str, template: Path, seconds: float
) -> subprocess.Popen:
    args = [str(folder), name, outside, inside, str(template), str(seconds)]
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=REPO
    )


if __name__ == "__main__":
    folder_arg, name_arg, outside_arg, inside_arg, template_arg, seconds_arg = sys.argv[1:]
    result = swap_names(
        Path(folder_arg), name_arg, outside_arg, inside_arg, Path(template_arg), float(seconds_arg)
    )
    print(json.dumps(result))
