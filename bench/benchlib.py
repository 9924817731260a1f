"""Helpers shared by the benchmark scripts: folders, real checkpoint bytes, inotify, statistics.

Every script runs from the repository root as `python bench/NAME.py [--quick]`, so this module is
imported by its plain name. Nothing here imports torch: checkpoint bytes come from a child process.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import json
import os
import platform
import select
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PYTHON = sys.executable
RUN = "20260101_000000"
"""Run name used in benchmark checkpoint names, in the trainer's YYYYmmdd_HHMMSS form."""
PATTERN = "model_v2_step*.pt"


def checkpoint_name(step: int, run: str = RUN, seed: int = 0) -> str:
    return f"model_v2_step{step}_{run}_s{seed}.pt"


def parse_args(description: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and few repetitions, for the CI smoke test"
    )
    parser.add_argument(
        "--tmp", default="/tmp", help="parent folder of the benchmark folders (default /tmp)"
    )
    parser.add_argument(
        "--results",
        default=str(RESULTS),
        help="folder for the JSON and markdown results (default bench/results)",
    )
    args = parser.parse_args(argv)
    set_results_folder(Path(args.results))
    return args


def set_results_folder(folder: Path) -> None:
    """Send the results of write_results to `folder` instead of bench/results."""
    global RESULTS
    RESULTS = folder


# ---------------------------------------------------------------------------
# Statistics


def percentile(samples: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile, so p99 of 300 samples is the 297th smallest."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


def summarize(samples: list[float]) -> dict[str, float]:
    """Return count, median, quartiles, p99, min and max of the samples."""
    if not samples:
        return {"n": 0}
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "p25": percentile(samples, 0.25),
        "p75": percentile(samples, 0.75),
        "p99": percentile(samples, 0.99),
        "min": min(samples),
        "max": max(samples),
    }


def interleave(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call each variant once per round, rotating the order each round; collect the results.

    Rotation spreads slow phases of a shared machine over all variants instead of one.
    """
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(variants[name]())
    return samples


def ratio(numerator: dict, denominator: dict) -> float | None:
    if not numerator.get("n") or not denominator.get("n") or denominator["median"] == 0:
        return None
    return numerator["median"] / denominator["median"]


def format_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    milliseconds = seconds * 1000
    return f"{milliseconds:.3f}" if milliseconds < 1 else f"{milliseconds:.2f}"


def table_ms(rows: dict[str, dict], reference: str | None = None) -> str:
    """Return a markdown table of summaries in milliseconds, with the ratio to `reference`."""
    header = "| variant | n | median ms | p25-p75 ms | p99 ms | min-max ms |"
    rule = "|---|---|---|---|---|---|"
    if reference:
        header += f" ratio to {reference} |"
        rule += "---|"
    lines = [header, rule]
    for name, summary in rows.items():
        if not summary.get("n"):
            lines.append(f"| {name} | 0 | - | - | - | - |" + (" - |" if reference else ""))
            continue
        line = (
            f"| {name} | {summary['n']} | {format_ms(summary['median'])} | "
            f"{format_ms(summary['p25'])}-{format_ms(summary['p75'])} | "
            f"{format_ms(summary['p99'])} | "
            f"{format_ms(summary['min'])}-{format_ms(summary['max'])} |"
        )
        if reference:
            value = ratio(summary, rows[reference])
            line += f" {value:.2f} |" if value is not None else " - |"
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Machine and results


def machine_info(folder: str | os.PathLike) -> dict[str, object]:
    """Describe the machine: cores, memory, filesystem of `folder`, and software versions."""
    from watcher.mounts import filesystem_type

    with open("/proc/self/mountinfo", encoding="utf-8") as file:
        fstype = filesystem_type(os.path.realpath(folder), file.read())
    meminfo = Path("/proc/meminfo").read_text().split()
    memory_kib = int(meminfo[meminfo.index("MemTotal:") + 1])
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "folder": str(folder),
        "filesystem": fstype,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "watchdog": _version("watchdog"),
        "watcher_source_sha256": source_digest(REPO / "watcher"),
    }


def source_digest(package: Path) -> str:
    """Return a SHA-256 over the package's .py files, naming the code version measured."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_results(name: str, results: dict, markdown: str) -> Path:
    """Write results as bench/results/NAME.json and NAME.md and print the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    return path


@contextmanager
def bench_folder(parent: str, name: str) -> Iterator[Path]:
    """Create a fresh folder under `parent` and remove it afterwards, even on failure."""
    folder = Path(tempfile.mkdtemp(prefix=f"ckpt-bench-{name}-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def require_free_disk(folder: str, needed_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * 2:
        raise SystemExit(
            f"{folder} has {free / 2**30:.1f} GiB free; this benchmark needs about "
            f"{needed_bytes / 2**30:.1f} GiB and twice that as margin: free space or pass --tmp"
        )


# ---------------------------------------------------------------------------
# Checkpoint bytes and files

_SMALL_CHECKPOINT_CODE = """
import io, sys, torch
state = {"model": {"weight": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, "step": 1}
buffer = io.BytesIO()
torch.save(state, buffer)
sys.stdout.buffer.write(buffer.getvalue())
"""


def small_checkpoint_bytes() -> bytes:
    """Return the bytes of a real torch.save file of about 1.5 KB, made in a child process."""
    result = subprocess.run(
        [PYTHON, "-c", _SMALL_CHECKPOINT_CODE], capture_output=True, check=True, timeout=120
    )
    return result.stdout


def write_bytes(path: str | os.PathLike, data: bytes, mtime_ns: int | None = None) -> None:
    """Write a file with one write call and no fsync; set its mtime when given."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def save_atomically(folder: Path, name: str, data: bytes) -> float:
    """Write `name` as a dot-named temp file, rename it into place; return the rename time.

    The time is time.perf_counter() taken just before os.replace, the instant that completes
    the checkpoint.
    """
    temp = folder / f".{name}.tmp"
    write_bytes(temp, data)
    started = time.perf_counter()
    os.replace(temp, folder / name)
    return started


# ---------------------------------------------------------------------------
# inotify, through libc

IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class Inotify:
    """One inotify watch on a folder, read in the calling thread.

    Events are timestamped with time.perf_counter() when read() returns them, so the
    resolution of a measured time is the wake-up latency of poll(), tens of microseconds.
    """

    def __init__(self, folder: str | os.PathLike, mask: int) -> None:
        self.fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"inotify_init1 failed: {os.strerror(error)}")
        if _libc.inotify_add_watch(self.fd, os.fsencode(folder), mask) < 0:
            error = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(error, f"inotify_add_watch on {folder} failed: {os.strerror(error)}")
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def read(self, timeout: float) -> list[tuple[float, int, str]]:
        """Wait up to `timeout` seconds; return the (time, mask, name) events then pending."""
        if not self._poll.poll(max(0, int(timeout * 1000))):
            return []
        now = time.perf_counter()
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return []
        events = []
        offset = 0
        while offset < len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            name = data[offset : offset + length].rstrip(b"\0").decode("utf-8", "surrogateescape")
            offset += length
            if mask & IN_Q_OVERFLOW:
                raise RuntimeError("inotify queue overflowed: the measurement lost events")
            events.append((now, mask, name))
        return events

    def drain(self) -> None:
        while self.read(0):
            pass

    def wait_for(self, mask: int, name: str, timeout: float) -> float | None:
        """Return the time an event with `mask` for `name` arrives, or None after `timeout`."""
        deadline = time.perf_counter() + timeout
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return None
            for when, event_mask, event_name in self.read(remaining):
                if event_mask & mask and event_name == name:
                    return when

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------------
# Processes


class Daemon:
    """A `python -m watcher DIR` daemon started from the repository root, log in a file."""

    def __init__(self, folder: Path, *args: str, log_dir: Path) -> None:
        self.log_path = log_dir / f"watcher-{folder.name}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [PYTHON, "-m", "watcher", str(folder), *args],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 120.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.process.poll() is not None:
                raise RuntimeError(f"watcher exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"watcher did not log {text!r} in {timeout} s:\n{self.log()}")
            time.sleep(0.02)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@contextmanager
def running_daemon(folder: Path, *args: str, log_dir: Path) -> Iterator[Daemon]:
    """Start a watcher daemon, wait for its first pass, and stop it afterwards."""
    daemon = Daemon(folder, *args, log_dir=log_dir)
    try:
        daemon.wait_for_log("pass done")
        yield daemon
    finally:
        daemon.stop()


def proc_status(pid: int) -> dict[str, int]:
    """Return the kB fields of /proc/PID/status (VmRSS, VmHWM, ...)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            values[key] = int(parts[0])
    return values


def cpu_seconds(pid: int) -> float:
    """Return utime + stime of a process from /proc/PID/stat, in seconds (clock-tick units)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def run_seconds(pid: int) -> float:
    """Return the on-CPU time of all threads of a process from schedstat, in seconds (ns units)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # thread ended while listing
    return total / 1e9
