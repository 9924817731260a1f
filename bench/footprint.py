"""Footprint of the idle watcher daemon: resident memory, CPU time while idle, torch not loaded.

The daemon watches a folder of 10 small checkpoints. After its first pass and a settle time,
VmRSS and VmHWM come from /proc/PID/status, and CPU time over the idle window from
/proc/PID/stat (utime + stime, in clock ticks of 10 ms) and from the schedstat of every thread
(nanoseconds). Two reference processes run through the same window: a bare Python interpreter
that sleeps, and a Python process with an idle watchdog observer on the same folder. The
alternatives (in-loop retention, cron) keep no process of their own while idle. A second daemon,
started on a folder that does not exist, is measured through the same window as it waits for it.

torch must not be imported: the daemon's /proc/PID/maps is searched for torch's libraries, and a
second daemon started with `python -X importtime` lists every module it imports.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import benchlib as lib

SETTLE_SECONDS = 2.0
_WATCHDOG_IDLE_CODE = """
import sys, time
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer
observer = Observer()
observer.schedule(FileSystemEventHandler(), sys.argv[1])
observer.start()
time.sleep(10**6)
"""


def torch_mapped(pid: int) -> list[str]:
    """Return the mapped files of the process that belong to torch."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and ("libtorch" in parts[5] or "/torch/" in parts[5]):
            found.add(parts[5])
    return sorted(found)


def imported_modules(folder: Path, log_dir: Path) -> list[str]:
    """Start a daemon under -X importtime, wait for its first pass, return every module imported."""
    log_path = log_dir / "importtime.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [lib.PYTHON, "-X", "importtime", "-m", "watcher", str(folder)],
            cwd=lib.REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while "pass done" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            process.terminate()
            process.wait(15)
    modules = []
    for line in log_path.read_text().splitlines():
        if line.startswith("import time:") and "|" in line:
            modules.append(line.rsplit("|", 1)[1].strip())
    return modules


def sample(pid: int) -> dict[str, float]:
    status = lib.proc_status(pid)
    return {
        "VmRSS_kB": status["VmRSS"],
        "VmHWM_kB": status["VmHWM"],
        "cpu_ticks_s": lib.cpu_seconds(pid),
        "schedstat_s": lib.run_seconds(pid),
    }


def main(argv=None) -> int:
    args = lib.parse_args(__doc__.splitlines()[0], argv)
    idle_seconds = 3.0 if args.quick else 60.0
    data = lib.small_checkpoint_bytes()
    with lib.bench_folder(args.tmp, "footprint") as folder:
        machine = lib.machine_info(folder)
        checkpoints = folder / "checkpoints"
        checkpoints.mkdir()
        for step in range(1, 11):
            lib.write_bytes(checkpoints / lib.checkpoint_name(step * 1000), data)
        references = {
            "python sleeping": subprocess.Popen(
                [lib.PYTHON, "-c", "import time; time.sleep(10**6)"]
            ),
            "python + idle watchdog observer": subprocess.Popen(
                [lib.PYTHON, "-c", _WATCHDOG_IDLE_CODE, str(checkpoints)]
            ),
        }
        waiting = lib.Daemon(folder / "missing" / "checkpoints", log_dir=folder)
        try:
            waiting.wait_for_log("waiting for it to appear")
            with lib.running_daemon(
                checkpoints, "--keep-last", "2", "--keep-every", "1000", log_dir=folder
            ) as daemon:
                pids = {"watcher daemon": daemon.pid, "watcher daemon, folder missing": waiting.pid}
                pids.update({name: process.pid for name, process in references.items()})
                time.sleep(SETTLE_SECONDS)
                before = {name: sample(pid) for name, pid in pids.items()}
                time.sleep(idle_seconds)
                after = {name: sample(pid) for name, pid in pids.items()}
                torch_files = torch_mapped(daemon.pid)
                log = daemon.log()
        finally:
            waiting.stop()
            for process in references.values():
                process.terminate()
                process.wait(15)
        modules = imported_modules(checkpoints, folder)
    torch_modules = [name for name in modules if name == "torch" or name.startswith("torch.")]

    rows = {}
    for name in pids:
        rows[name] = {
            "VmRSS_MB": after[name]["VmRSS_kB"] / 1024,
            "VmHWM_MB": after[name]["VmHWM_kB"] / 1024,
            "idle_cpu_ticks_s": after[name]["cpu_ticks_s"] - before[name]["cpu_ticks_s"],
            "idle_schedstat_s": after[name]["schedstat_s"] - before[name]["schedstat_s"],
        }
    watcher = rows["watcher daemon"]
    waiting_cpu = rows["watcher daemon, folder missing"]
    targets = {
        "VmRSS < 35 MB": watcher["VmRSS_MB"] < 35,
        "VmHWM < 35 MB": watcher["VmHWM_MB"] < 35,
        f"idle CPU over {idle_seconds:.0f} s < 0.1 s": max(
            watcher["idle_cpu_ticks_s"], watcher["idle_schedstat_s"]
        )
        < 0.1,
        f"idle CPU over {idle_seconds:.0f} s waiting for a missing folder < 0.1 s": max(
            waiting_cpu["idle_cpu_ticks_s"], waiting_cpu["idle_schedstat_s"]
        )
        < 0.1,
        "torch not mapped and not imported": bool(modules)
        and not torch_files
        and not torch_modules,
    }
    results = {
        "machine": machine,
        "quick": args.quick,
        "idle_seconds": idle_seconds,
        "rows": rows,
        "torch_mapped_files": torch_files,
        "torch_modules_imported": torch_modules,
        "modules_imported": len(modules),
        "passes_logged": log.count("pass done"),
        "targets": targets,
    }
    lines = [
        "## Footprint of the idle daemon",
        "",
        (
            f"Idle window {idle_seconds:.0f} s after the first pass and {SETTLE_SECONDS:.0f} s "
            "of settling; 1 MB = 1024 kB."
        ),
        "",
        "| process | VmRSS MB | VmHWM MB | idle CPU, utime+stime s | idle CPU, schedstat s |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['VmRSS_MB']:.1f} | {row['VmHWM_MB']:.1f} | "
            f"{row['idle_cpu_ticks_s']:.2f} | {row['idle_schedstat_s']:.4f} |"
        )
    lines += [
        "",
        (
            f"torch files mapped by the daemon: {len(torch_files)}; "
            f"torch modules imported: {len(torch_modules)} of {len(modules)} modules listed "
            "by -X importtime."
        ),
        "",
    ]
    lines += [f"- {name}: {'met' if met else 'MISSED'}" for name, met in targets.items()]
    lib.write_results("footprint", results, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
