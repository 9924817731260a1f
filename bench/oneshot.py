"""One-shot pruning of a large folder: `python -m watcher DIR --once` against the alternatives.

The folder contains one series of small real torch files, steps 1..N with mtimes rising with the
step, and every method keeps the newest 2. Before each run the folder is rebuilt identically:
the same names, bytes and mtimes, written as separate files (no hard links, which would share
one inode), then os.sync() so that no method pays for the previous build's writeback.

Process variants are timed from spawn to exit and so include interpreter start-up. In-process
variants call the same code in this process with the modules already imported: for the watcher
that is watcher.cli.main([... '--once']) with its log sent to /dev/null, as the process variant's
log is. The page cache is warm for every variant, since each runs right after the rebuild.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import alternatives
import benchlib as lib

KEEP = 2
BENCH_DIR = Path(__file__).resolve().parent
_ALTERNATIVE_CODE = "import sys; sys.path.insert(0, {bench!r}); import alternatives; "


class Folder:
    """A folder that can be rebuilt to the same N checkpoints at any time."""

    def __init__(self, path: Path, count: int, data: bytes) -> None:
        self.path = path
        self.count = count
        self.data = data
        self.names = [lib.checkpoint_name(step) for step in range(1, count + 1)]
        self.base_ns = time.time_ns() - 10**13

    def rebuild(self) -> None:
        with os.scandir(self.path) as listing:
            for entry in listing:
                os.unlink(entry.path)
        for index, name in enumerate(self.names):
            lib.write_bytes(self.path / name, self.data, self.base_ns + index * 1_000_000)
        os.sync()

    def survivors(self) -> list[str]:
        return sorted(name for name in os.listdir(self.path) if not name.startswith("."))

    def expected(self) -> list[str]:
        return sorted(self.names[-KEEP:])


def _run(command: list[str]) -> None:
    subprocess.run(
        command, cwd=lib.REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _watcher_in_process(folder: Path) -> None:
    from watcher.cli import main

    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        status = main([str(folder), "--once", "--keep-last", str(KEEP)])
    if status != 0:
        raise RuntimeError(f"watcher --once exited with {status}")


def variants(folder: Path) -> dict[str, callable]:
    """Return the timed actions; each leaves the folder with only the newest KEEP files."""
    pattern = lib.PATTERN
    prefix = _ALTERNATIVE_CODE.format(bench=str(BENCH_DIR))
    glob_code = prefix + f"alternatives.glob_and_sort({str(folder)!r}, {pattern!r}, {KEEP})"
    bare_code = prefix + f"alternatives.bare_scan({str(folder)!r}, {KEEP})"
    return {
        "watcher --once (process)": lambda: _run(
            [lib.PYTHON, "-m", "watcher", str(folder), "--once", "--keep-last", str(KEEP)]
        ),
        "glob+mtime sort (process)": lambda: _run([lib.PYTHON, "-c", glob_code]),
        "bare scan (process)": lambda: _run([lib.PYTHON, "-c", bare_code]),
        "cron pipeline (process)": lambda: alternatives.run_cron(folder, pattern, KEEP),
        "watcher --once (in-process)": lambda: _watcher_in_process(folder),
        "glob+mtime sort (in-process)": lambda: alternatives.glob_and_sort(folder, pattern, KEEP),
        "bare scan (in-process)": lambda: alternatives.bare_scan(folder, KEEP),
    }


def _cpu_seconds() -> float:
    """User and system time of this process and of every child it has waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(
    folder: Folder, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], list[str]]:
    """Return the wall times and the CPU times of every variant, and any wrong outcome.

    The CPU time counts every process of a variant, the watcher's deleting processes too, since
    each is waited for by its parent.
    """
    actions = variants(folder.path)
    errors = []
    cpu: dict[str, list[float]] = {name: [] for name in actions}

    def timed(name: str):
        def run() -> float:
            folder.rebuild()
            cpu_before = _cpu_seconds()
            started = time.perf_counter()
            actions[name]()
            elapsed = time.perf_counter() - started
            cpu[name].append(_cpu_seconds() - cpu_before)
            if folder.survivors() != folder.expected():
                errors.append(f"{name} left {len(folder.survivors())} files")
            return elapsed

        return run

    samples = lib.interleave({name: timed(name) for name in actions}, rounds)
    return samples, cpu, errors


def phase_costs(parent: Path, data: bytes, count: int, rounds: int) -> dict[str, dict]:
    """Time the parts of a one-shot pass per file, each on a freshly built folder of `count`.

    The watcher deletes a file by renaming it to a hidden name, checking it with lstat and
    unlinking it, and logs a line. The bare scan only unlinks. Returns seconds-per-file summaries.
    """
    import logging

    from watcher.scan import NameMatcher, scan_folder
    from watcher.validity.checks import open_and_check

    folder = Folder(parent / "phases", count, data)
    folder.path.mkdir()
    logger = logging.getLogger("bench.oneshot.phases")
    logger.propagate = False
    sink = open(os.devnull, "w")  # noqa: SIM115 - closed below
    logger.addHandler(logging.StreamHandler(sink))
    logger.setLevel(logging.INFO)

    def per_file(action) -> callable:
        def run() -> float:
            folder.rebuild()
            dir_fd = os.open(folder.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                started = time.perf_counter()
                action(dir_fd)
                return (time.perf_counter() - started) / count
            finally:
                os.close(dir_fd)

        return run

    def unlink(dir_fd: int) -> None:
        for name in folder.names:
            os.unlink(name, dir_fd=dir_fd)

    def hidden_delete(dir_fd: int) -> None:
        for name in folder.names:
            hidden = ".ckpt-watcher.pruning." + name
            os.rename(name, hidden, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.stat(hidden, dir_fd=dir_fd, follow_symlinks=False)
            os.unlink(hidden, dir_fd=dir_fd)

    def check(dir_fd: int) -> None:
        for name in folder.names:
            open_and_check(dir_fd, name)

    def log_lines(_dir_fd: int) -> None:
        for name in folder.names:
            logger.info("pruned %r (step %d): older than the newest 2", name, 1)

    def scan(dir_fd: int) -> None:
        scan_folder(dir_fd, NameMatcher(lib.PATTERN))

    phases = {
        "unlink (the bare scan's deletion)": per_file(unlink),
        "rename to a hidden name, lstat, unlink": per_file(hidden_delete),
        "validity check (open_and_check)": per_file(check),
        "one log line": per_file(log_lines),
        "scan: list and lstat": per_file(scan),
    }
    try:
        samples = lib.interleave(phases, rounds)
    finally:
        sink.close()
    return {name: lib.summarize(values) for name, values in samples.items()}


def start_up(rounds: int) -> dict[str, dict]:
    """Time interpreter start-up alone: bare, and with the watcher's one-shot modules."""
    commands = {
        "python -c pass": [lib.PYTHON, "-c", "pass"],
        "python: import watcher.cli": [lib.PYTHON, "-c", "import watcher.cli"],
    }

    def timed(command):
        def run() -> float:
            started = time.perf_counter()
            _run(command)
            return time.perf_counter() - started

        return run

    samples = lib.interleave({name: timed(cmd) for name, cmd in commands.items()}, rounds)
    return {name: lib.summarize(values) for name, values in samples.items()}


def main(argv=None) -> int:
    args = lib.parse_args(__doc__.splitlines()[0], argv)
    count = 1_000 if args.quick else 100_000
    rounds = 1 if args.quick else 3
    data = lib.small_checkpoint_bytes()
    lib.require_free_disk(args.tmp, count * 8192)
    with lib.bench_folder(args.tmp, "oneshot") as parent:
        machine = lib.machine_info(parent)
        folder = Folder(parent, count, data)
        started = time.perf_counter()
        folder.rebuild()
        build_seconds = time.perf_counter() - started
        samples, cpu, errors = measure(folder, rounds)
        phases = phase_costs(parent, data, 1_000 if args.quick else 10_000, rounds + 2)
    startup = start_up(rounds * 5)

    summaries = {name: lib.summarize(values) for name, values in samples.items()}
    cpu_summaries = {name: lib.summarize(values) for name, values in cpu.items()}
    watcher_process = summaries["watcher --once (process)"]
    watcher_pass = summaries["watcher --once (in-process)"]
    targets = {
        "process: no slower than glob+mtime sort": lib.ratio(
            watcher_process, summaries["glob+mtime sort (process)"]
        )
        <= 1.0,
        "process: within 1.5x of the bare scan": lib.ratio(
            watcher_process, summaries["bare scan (process)"]
        )
        <= 1.5,
        "in-process: no slower than glob+mtime sort": lib.ratio(
            watcher_pass, summaries["glob+mtime sort (in-process)"]
        )
        <= 1.0,
        "in-process: within 1.5x of the bare scan": lib.ratio(
            watcher_pass, summaries["bare scan (in-process)"]
        )
        <= 1.5,
    }
    results = {
        "machine": machine,
        "quick": args.quick,
        "files": count,
        "file_bytes": len(data),
        "rounds": rounds,
        "build_seconds": build_seconds,
        "summaries": summaries,
        "cpu_summaries": cpu_summaries,
        "start_up": startup,
        "phases_seconds_per_file": phases,
        "errors": errors,
        "targets": targets,
    }
    process = {name: value for name, value in summaries.items() if "(process)" in name}
    in_process = {name: value for name, value in summaries.items() if "(in-process)" in name}
    lines = [
        f"## One-shot pruning of {count} checkpoints ({len(data)} bytes each, keep {KEEP})",
        "",
        (
            f"{rounds} runs per variant, interleaved, folder rebuilt before each run "
            f"(a rebuild takes {build_seconds:.1f} s)."
        ),
        "",
        lib.table_ms(process, "watcher --once (process)"),
        "",
        lib.table_ms(in_process, "watcher --once (in-process)"),
        "",
        "CPU time of each run, user and system, over all of its processes:",
        "",
        lib.table_ms(cpu_summaries, "glob+mtime sort (process)"),
        "",
        "Parts of a pass, in ms per file (each on a freshly built folder, interleaved):",
        "",
        lib.table_ms(phases),
        "",
        "Interpreter start-up alone:",
        "",
        lib.table_ms(startup),
        "",
    ]
    lines += [f"- {name}: {'met' if met else 'MISSED'}" for name, met in targets.items()]
    if errors:
        lines += ["", "Wrong results: " + "; ".join(errors)]
    lib.write_results("oneshot", results, "\n".join(lines))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
