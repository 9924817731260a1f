"""Cost to the trainer: training steps per second with retention running, and the atomic save.

Steps per second, one run: a single trainer run beside a watcher daemon that is paused and
resumed every few seconds, so that both states share one process and one machine state.

Steps per second, separate runs: `python -m trainer` runs with its default model, saving every
few steps, in four variants interleaved run by run. It runs alone (checkpoints pile up), beside
a watcher daemon on its checkpoint folder, and with in-loop retention or a framework's
saved-file list added after each save. The in-loop variants run the trainer through a wrapper
that replaces trainer.loop.save with the original save followed by the retention call.

Rates come from the trainer's own log lines, between step reports, so interpreter start-up and
the torch import are left out and the save time is included.

Save cost: in one process, the trainer's state (model, AdamW state, RNG states) is saved with
the trainer's BackgroundSaver and with a plain torch.save to the final path, interleaved,
beside a watcher daemon that prunes the folder. The background save is timed until the call
returns, which is how long the training loop is blocked, and until its checkpoint is durable
under its name (temp file fsynced, renamed, folder fsynced). Other variants: the alternative of
serializing into an in-memory buffer and writing it with one os.write before the same
background part, the synchronous save_atomic, torch.save followed by fsync, and a temp file
renamed into place without fsync.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import benchlib as lib

BENCH_DIR = Path(__file__).resolve().parent
ALONE = "trainer alone"
_LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO trainer\.loop: step (\d+) loss", re.MULTILINE
)
_WRAPPER_CODE = """
import sys
sys.path.insert(0, {bench!r})
import alternatives
import trainer.loop as loop
from trainer.checkpoint import checkpoint_name

original_save = loop.save
mode = sys.argv[1]
saved = alternatives.SavedList(2)

def save(run):
    original_save(run)
    # In-loop retention runs once the save is complete, as it does after a synchronous save.
    run.saver.wait()
    folder = loop.checkpoint_folder(run.config)
    if mode == "glob":
        alternatives.glob_and_sort(folder, "model_v2_step*.pt", 2)
    else:
        saved.after_save(folder / checkpoint_name(run.step, run.name, run.config.seed))

loop.save = save
from trainer.cli import main
sys.exit(main(sys.argv[2:]))
"""
QUICK_MODEL = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--max-corpus-bytes"]


def trainer_rate(log: str) -> float:
    """Return steps per second between the first and the last step report of a trainer log."""
    reports = [
        (datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f"), int(step))
        for stamp, step in _LOG_LINE.findall(log)
    ]
    if len(reports) < 2:
        raise RuntimeError(f"trainer log has fewer than two step reports:\n{log[-2000:]}")
    (first_time, first_step), (last_time, last_step) = reports[0], reports[-1]
    return (last_step - first_step) / (last_time - first_time).total_seconds()


class TrainerRuns:
    """Run the trainer variants, each in a fresh log folder under `parent`."""

    def __init__(self, parent: Path, train_args: list[str]) -> None:
        self.parent = parent
        self.train_args = train_args
        self.count = 0

    def _log_dir(self) -> Path:
        self.count += 1
        log_dir = self.parent / f"run{self.count}"
        (log_dir / "checkpoints").mkdir(parents=True)
        return log_dir

    def _train(self, prefix: list[str], log_dir: Path) -> float:
        result = subprocess.run(
            [*prefix, "--log-dir", str(log_dir), *self.train_args],
            cwd=lib.REPO,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"trainer exited with {result.returncode}:\n{result.stderr}")
        return trainer_rate(result.stderr)

    def alone(self) -> float:
        return self._train([lib.PYTHON, "-m", "trainer"], self._log_dir())

    def with_watcher(self) -> float:
        log_dir = self._log_dir()
        with lib.running_daemon(log_dir / "checkpoints", "--keep-last", "2", log_dir=log_dir):
            return self._train([lib.PYTHON, "-m", "trainer"], log_dir)

    def with_wrapper(self, mode: str) -> float:
        return self._train(wrapper_command(mode), self._log_dir())


def wrapper_command(mode: str) -> list[str]:
    """Return the command that runs the trainer with in-loop retention: 'glob' or 'list'."""
    return [lib.PYTHON, "-c", _WRAPPER_CODE.format(bench=str(BENCH_DIR)), mode]


def measure_rates(parent: Path, quick: bool, rounds: int) -> dict[str, list[float]]:
    train_args = ["--seed", "0", "--log-every", "5"]
    if quick:
        train_args += ["--steps", "10", "--save-every-steps", "5", *QUICK_MODEL, "200000"]
    else:
        train_args += ["--steps", "300", "--save-every-steps", "10"]
    runs = TrainerRuns(parent, train_args)
    variants = {
        ALONE: runs.alone,
        "trainer + watcher daemon": runs.with_watcher,
        "trainer + in-loop glob+mtime sort": lambda: runs.with_wrapper("glob"),
        "trainer + framework saved list": lambda: runs.with_wrapper("list"),
    }
    if quick:
        # The smoke test keeps to two trainer starts here; highwater.py runs the wrappers too.
        variants = {name: variants[name] for name in (ALONE, "trainer + watcher daemon")}
    return lib.interleave(variants, rounds)


def _report_times(log: str) -> list[tuple[float, int]]:
    """Return (epoch seconds, step) of each step report in a trainer log (local-time stamps)."""
    return [
        (datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp(), int(step))
        for stamp, step in _LOG_LINE.findall(log)
    ]


def measure_toggled(parent: Path, quick: bool) -> dict:
    """Run one trainer beside a daemon that is paused and resumed every few seconds.

    SIGSTOP pauses the daemon and SIGCONT resumes it, so the same trainer process, on the same
    machine state, trains alternately with and without a running watcher. Each interval between
    two step reports that lies wholly inside one window counts for that window's state. Events
    that arrive while the daemon is paused are handled when it resumes, so that catch-up work
    lands in the running windows.
    """
    toggle_seconds = 0.5 if quick else 3.0
    steps = "30" if quick else "1200"
    log_dir = parent / "toggled"
    checkpoints = log_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    train_args = ["--seed", "0", "--log-every", "5", "--save-every-steps", "10", "--steps", steps]
    if quick:
        train_args += [*QUICK_MODEL, "200000"]
    log_path = log_dir / "trainer.log"
    windows: list[tuple[float, float, bool]] = []
    with lib.running_daemon(checkpoints, "--keep-last", "2", log_dir=log_dir) as daemon:
        daemon_cpu = lib.run_seconds(daemon.pid)
        children = os.times()
        with open(log_path, "w") as log:
            trainer = subprocess.Popen(
                [lib.PYTHON, "-m", "trainer", "--log-dir", str(log_dir), *train_args],
                cwd=lib.REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            running, started = True, time.time()
            while trainer.poll() is None:
                time.sleep(0.02)
                now = time.time()
                if now - started >= toggle_seconds:
                    windows.append((started, now, running))
                    os.kill(daemon.pid, signal.SIGSTOP if running else signal.SIGCONT)
                    running, started = not running, now
            windows.append((started, time.time(), running))
            if not running:
                os.kill(daemon.pid, signal.SIGCONT)
        daemon_cpu = lib.run_seconds(daemon.pid) - daemon_cpu
        after = os.times()
        trainer_cpu = (after.children_user - children.children_user) + (
            after.children_system - children.children_system
        )
    if trainer.returncode != 0:
        raise RuntimeError(f"trainer exited with {trainer.returncode}:\n{log_path.read_text()}")
    return _rates_by_state(_report_times(log_path.read_text()), windows) | {
        "daemon_cpu_seconds": daemon_cpu,
        "trainer_cpu_seconds": trainer_cpu,
        "toggle_seconds": toggle_seconds,
        "train_args": train_args,
    }


def _num(value: float | None, spec: str) -> str:
    """Format a figure, or 'n/a' when a short run had no window to measure it in."""
    return "n/a" if value is None else format(value, spec)


def _rates_by_state(reports, windows) -> dict:
    totals = {True: [0, 0.0], False: [0, 0.0]}
    per_window: dict[bool, list[float]] = {True: [], False: []}
    for start, end, running in windows:
        steps, seconds = 0, 0.0
        for (t0, s0), (t1, s1) in itertools.pairwise(reports):
            if t0 >= start and t1 <= end:
                steps += s1 - s0
                seconds += t1 - t0
        if seconds > 0:
            per_window[running].append(steps / seconds)
            totals[running][0] += steps
            totals[running][1] += seconds
    rate = {
        state: steps / seconds if seconds else None for state, (steps, seconds) in totals.items()
    }
    return {
        "rate_running": rate[True],
        "rate_paused": rate[False],
        "ratio": rate[True] / rate[False] if rate[True] and rate[False] else None,
        "windows_running": lib.summarize(per_window[True]),
        "windows_paused": lib.summarize(per_window[False]),
    }


SAVE_VARIANTS = {
    "plain": "torch.save to the final path",
    "blocked": "trainer save: training loop blocked",
    "durable": "trainer save: until durable",
    "buffer_blocked": "buffer + one os.write, background fsync: loop blocked",
    "buffer_durable": "buffer + one os.write, background fsync: until durable",
    "atomic": "synchronous save_atomic (fsync + rename)",
    "plain_fsync": "torch.save + fsync",
    "rename": "temp + rename, no fsync",
}
"""Save variants by the key the measuring child process uses, with the names on the page."""
PLAIN = SAVE_VARIANTS["plain"]

_SAVE_CODE = """
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
sys.path.insert(0, {bench!r})
import torch
from trainer.checkpoint import temp_path
from trainer.config import build_config
from trainer.loop import checkpoint_folder, start_run
from trainer.saving import BackgroundSaver, finish_save, save_atomic
import benchlib as lib

folder = sys.argv[1]
rounds = int(sys.argv[2])
options = json.loads(sys.argv[3])
names = json.loads(sys.argv[4])
config, explicit = build_config({{}}, "benchmark", {{"log_dir": folder, **options}})
run = start_run(config, explicit, resume=False)
payload = {{
    "model": run.model.state_dict(),
    "optimizer": run.optimizer.state_dict(),
    "step": 0,
    "run": run.name,
    "config": run.config.to_dict(),
    "torch_rng_state": torch.get_rng_state(),
    "sampler_rng_state": run.sampler.get_state(),
    "corpus_sha256": run.corpus.sha256,
}}
# One optimizer step, so that the AdamW state holds its moment tensors as in a real save.
loss = run.model.loss(*run.sampler.next_batch())
loss.backward()
run.optimizer.step()
payload["optimizer"] = run.optimizer.state_dict()
checkpoints = checkpoint_folder(config)
checkpoints.mkdir(parents=True, exist_ok=True)
steps = {{}}
saver = BackgroundSaver()
executor = ThreadPoolExecutor(max_workers=1)
durable = {{names["durable"]: [], names["buffer_durable"]: []}}

def path_for(seed):
    steps[seed] = steps.get(seed, 0) + 1
    return checkpoints / lib.checkpoint_name(steps[seed], run.name, seed)

def plain():
    torch.save(payload, path_for(1))

def background():
    saver.save(payload, path_for(2))

def atomic():
    save_atomic(payload, path_for(3))

def plain_fsync():
    path = path_for(4)
    with open(path, "wb") as file:
        torch.save(payload, file)
        file.flush()
        os.fsync(file.fileno())

def rename_no_fsync():
    path = path_for(5)
    temp = path.with_name("." + path.name + ".tmp")
    torch.save(payload, temp)
    os.replace(temp, path)

def finish_timed(file, path):
    finish_save(file, path)
    return time.perf_counter()

def buffer_write():
    path = path_for(6)
    buffer = BytesIO()
    torch.save(payload, buffer)
    file = open(temp_path(path), "wb", buffering=0)
    data = buffer.getbuffer()
    while data:
        data = data[file.write(data):]
    return executor.submit(finish_timed, file, path)

def timed(action, durable_name=None):
    def run_once():
        started = time.perf_counter()
        result = action()
        elapsed = time.perf_counter() - started
        if durable_name == names["durable"]:
            durable[durable_name].append(saver.wait().durable)
        elif durable_name is not None:
            durable[durable_name].append(result.result() - started)
        time.sleep(0.05)
        return elapsed
    return run_once

actions = {{
    names["plain"]: timed(plain),
    names["blocked"]: timed(background, names["durable"]),
    names["buffer_blocked"]: timed(buffer_write, names["buffer_durable"]),
    names["atomic"]: timed(atomic),
    names["plain_fsync"]: timed(plain_fsync),
    names["rename"]: timed(rename_no_fsync),
}}
# One untimed round first keeps one-time costs, such as starting the threads, out of the figures.
lib.interleave(actions, 1)
for values in durable.values():
    values.clear()
samples = lib.interleave(actions, rounds)
saver.close()
executor.shutdown()
samples.update(durable)
size = os.path.getsize(next(checkpoints.glob("model_v2_step*_s2.pt")))
print(json.dumps({{"samples": samples, "bytes": size}}))
"""


def measure_saves(parent: Path, quick: bool, rounds: int) -> dict:
    log_dir = parent / "saves"
    checkpoints = log_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    options = {"max_corpus_bytes": 200_000} if quick else {}
    if quick:
        options.update(d_model=32, n_layers=1, n_heads=2)
    with lib.running_daemon(checkpoints, "--keep-last", "2", log_dir=parent):
        result = subprocess.run(
            [
                lib.PYTHON,
                "-c",
                _SAVE_CODE.format(bench=str(BENCH_DIR)),
                str(log_dir),
                str(rounds),
                json.dumps(options),
                json.dumps(SAVE_VARIANTS),
            ],
            cwd=lib.REPO,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"save benchmark failed:\n{result.stderr}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    measured["samples"] = {name: measured["samples"][name] for name in SAVE_VARIANTS.values()}
    return measured


def paired_save_ratios(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Summarize, per variant, the ratio of each save to the plain torch.save of its round."""
    plain = samples[PLAIN]
    return {
        name: lib.summarize([value / base for value, base in zip(values, plain)])
        for name, values in samples.items()
        if name != PLAIN
    }


def save_report(saves: dict, save_rounds: int) -> tuple[dict, list[str]]:
    """Return the save figures for the JSON results and the lines of the save section."""
    summaries = {name: lib.summarize(values) for name, values in saves["samples"].items()}
    paired = paired_save_ratios(saves["samples"])
    blocked = lib.ratio(summaries[SAVE_VARIANTS["blocked"]], summaries[PLAIN])
    durable = lib.ratio(summaries[SAVE_VARIANTS["durable"]], summaries[PLAIN])
    figures = {
        "checkpoint_bytes": saves["bytes"],
        "saves": summaries,
        "save_ratio_paired": paired,
        "save_blocked_ratio": blocked,
        "save_durable_ratio": durable,
    }
    lines = [
        (
            f"Save of the trainer's state ({saves['bytes']} bytes), {save_rounds} saves per "
            "variant, interleaved, watcher daemon pruning the folder. A background save is "
            "timed twice: until the call returns (the training loop is blocked) and until "
            "the folder fsync after the rename returns (durable under its name). The "
            "benchmark waits idle for the background part, and a plain torch.save is never "
            "durable, so it has only the first time:"
        ),
        "",
        lib.table_ms(summaries, PLAIN),
        "",
        "Ratio of each save to the plain torch.save of the same round:",
        "",
        "| variant | median ratio | p25-p75 | min-max |",
        "|---|---|---|---|",
    ]
    for name, summary in paired.items():
        lines.append(
            f"| {name} | {summary['median']:.2f} | {summary['p25']:.2f}-{summary['p75']:.2f} | "
            f"{summary['min']:.2f}-{summary['max']:.2f} |"
        )
    lines += [
        "",
        (
            f"The trainer's save blocks the training loop for {blocked:.2f}x a plain torch.save "
            f"(ratio of medians) and makes the checkpoint durable after {durable:.2f}x."
        ),
        "",
    ]
    return figures, lines


def main(argv=None) -> int:
    args = lib.parse_args(__doc__.splitlines()[0], argv)
    rounds = 1 if args.quick else 3
    save_rounds = 3 if args.quick else 40
    with lib.bench_folder(args.tmp, "trainer") as parent:
        machine = lib.machine_info(parent)
        toggled = measure_toggled(parent, args.quick)
        started = time.monotonic()
        rates = measure_rates(parent, args.quick, rounds)
        rate_seconds = time.monotonic() - started
        saves = measure_saves(parent, args.quick, save_rounds)

    rate_summaries = {name: lib.summarize(values) for name, values in rates.items()}
    alone = rates[ALONE]
    paired = {
        name: lib.summarize([value / base for value, base in zip(values, alone)])
        for name, values in rates.items()
        if name != ALONE
    }
    save_figures, save_lines = save_report(saves, save_rounds)
    watcher_ratio = lib.ratio(rate_summaries["trainer + watcher daemon"], rate_summaries[ALONE])
    cpu_share = toggled["daemon_cpu_seconds"] / toggled["trainer_cpu_seconds"]
    targets = {
        "steps/s with the watcher running >= 0.99 x paused (one run)": (toggled["ratio"] or 0)
        >= 0.99,
        "steps/s with the watcher >= 0.99 x alone (separate runs)": watcher_ratio >= 0.99,
        "atomic save blocks the training loop within 1.15x of plain torch.save": (
            save_figures["save_blocked_ratio"] <= 1.15
        ),
    }
    results = {
        "machine": machine,
        "quick": args.quick,
        "rounds": rounds,
        "toggled": toggled,
        "daemon_cpu_share": cpu_share,
        "rate_seconds": rate_seconds,
        "rates": rate_summaries,
        "rate_ratio_paired": paired,
        **save_figures,
        "targets": targets,
    }
    running, paused = toggled["windows_running"], toggled["windows_paused"]
    lines = [
        "## Cost to the trainer",
        "",
        (
            f"One trainer run (`{' '.join(toggled['train_args'])}`) beside a watcher daemon "
            f"paused and resumed every {toggled['toggle_seconds']:g} s:"
        ),
        "",
        "| daemon | windows | steps/s over all windows | per-window median (min-max) |",
        "|---|---|---|---|",
        (
            f"| running | {running['n']} | {_num(toggled['rate_running'], '.2f')} | "
            f"{_num(running.get('median'), '.2f')} "
            f"({_num(running.get('min'), '.2f')}-{_num(running.get('max'), '.2f')}) |"
        ),
        (
            f"| paused | {paused['n']} | {_num(toggled['rate_paused'], '.2f')} | "
            f"{_num(paused.get('median'), '.2f')} "
            f"({_num(paused.get('min'), '.2f')}-{_num(paused.get('max'), '.2f')}) |"
        ),
        "",
        (
            f"Ratio running/paused: {_num(toggled['ratio'], '.3f')}. Over the run the daemon used "
            f"{_num(toggled['daemon_cpu_seconds'], '.3f')} s of CPU, the trainer "
            f"{_num(toggled['trainer_cpu_seconds'], '.1f')} s: a share of {_num(cpu_share, '.4f')}."
        ),
        "",
        f"Training rate in separate runs, {rounds} runs per variant, interleaved:",
        "",
        (
            "| variant | n | median steps/s | min-max steps/s | ratio of medians to alone |"
            " median of paired ratios (min-max) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for name, summary in rate_summaries.items():
        pair = paired.get(name)
        pair_text = f"{pair['median']:.3f} ({pair['min']:.3f}-{pair['max']:.3f})" if pair else "-"
        lines.append(
            f"| {name} | {summary['n']} | {summary['median']:.2f} | "
            f"{summary['min']:.2f}-{summary['max']:.2f} | "
            f"{lib.ratio(summary, rate_summaries[ALONE]):.3f} | {pair_text} |"
        )
    lines += [
        "",
        *save_lines,
    ]
    lines += [f"- {name}: {'met' if met else 'MISSED'}" for name, met in targets.items()]
    lib.write_results("trainer_cost", results, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
