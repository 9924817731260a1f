"""Tests of the trainer, run as a real subprocess (`python -m trainer`) on real files.

Most runs use TINY, a model of about 30,000 parameters, so each run takes about 2 s, most of
it the torch import.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from trainer.checkpoint import CHECKPOINT_GLOB, list_checkpoints, temp_path
from trainer.config import TrainConfig
from trainer.loop import new_run_name, save_due

TINY = {
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "seq_len": 32,
    "batch_size": 8,
    "max_corpus_bytes": 200_000,
    "lr": 0.01,
    "warmup_steps": 0,
    "log_every": 5,
}
NAME_PATTERN = re.compile(r"model_v2_step(\d+)_(\d{8}_\d{6})_s(\d+)\.pt")
LOSS_PATTERN = re.compile(r"INFO trainer\.loop: step (\d+) loss ([0-9.]+) steps/s ([0-9.]+)")
PAYLOAD_KEYS = {
    "model",
    "optimizer",
    "step",
    "run",
    "config",
    "torch_rng_state",
    "sampler_rng_state",
    "corpus_sha256",
}


def run_trainer(*args: str, cwd: Path, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=preexec_fn,
    )


def write_config(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def checkpoint_steps(log_dir: Path) -> dict[int, Path]:
    folder = log_dir / "checkpoints"
    return {int(NAME_PATTERN.fullmatch(p.name)[1]): p for p in folder.glob(CHECKPOINT_GLOB)}


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def temp_files(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if ".tmp" in name]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, datetime.datetime]:
    """A finished 40-step TINY run, saved every 15 steps, started with the underscore flags."""
    folder = tmp_path_factory.mktemp("base")
    config = write_config(folder / "tiny.yaml", **TINY)
    started = datetime.datetime.now()
    result = run_trainer(
        "--config", str(config), "--steps", "40", "--save_every_steps", "15",
        "--log_dir", str(folder / "logs"), cwd=folder,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return folder / "logs", result, started


@pytest.fixture
def base_copy(base_run, tmp_path) -> Path:
    """A copy of the base run's log folder that a test may change."""
    log_dir = tmp_path / "logs"
    shutil.copytree(base_run[0], log_dir)
    return log_dir


def test_help_lists_exit_codes(tmp_path):
    result = run_trainer("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "exit status" in result.stdout
    for status in ("0", "1", "2", "130"):
        assert re.search(rf"^  {status} ", result.stdout, re.MULTILINE), status


def test_underscore_flags_set_steps_and_folder(base_run):
    log_dir, _, _ = base_run
    assert sorted(checkpoint_steps(log_dir)) == [15, 30, 40]


def test_checkpoint_names_one_series(base_run):
    log_dir, _, started = base_run
    names = [p.name for p in checkpoint_steps(log_dir).values()]
    runs = {NAME_PATTERN.fullmatch(name)[2] for name in names}
    seeds = {NAME_PATTERN.fullmatch(name)[3] for name in names}
    assert len(runs) == 1
    assert seeds == {"0"}
    run_time = datetime.datetime.strptime(runs.pop(), "%Y%m%d_%H%M%S")
    assert abs((run_time - started).total_seconds()) < 60


def test_checkpoint_contents_weights_only(base_run):
    log_dir, _, _ = base_run
    for step, path in checkpoint_steps(log_dir).items():
        payload = load(path)
        assert set(payload) == PAYLOAD_KEYS
        assert payload["step"] == step
        assert payload["run"] in path.name
        assert payload["config"]["d_model"] == TINY["d_model"]
        assert all(
            type(v) in (str, int, float, bool, type(None)) for v in payload["config"].values()
        )
        assert payload["torch_rng_state"].dtype == torch.uint8
        assert payload["sampler_rng_state"].dtype == torch.uint8
        assert "token_embedding.weight" in payload["model"]
        assert payload["optimizer"]["state"], "optimizer state is empty"


def test_loss_falls(base_run):
    _, result, _ = base_run
    losses = [float(match[1]) for match in LOSS_PATTERN.findall(result.stderr)]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 1.0, losses


def test_one_log_line_per_save(base_run):
    log_dir, result, _ = base_run
    lines = [line for line in result.stderr.splitlines() if "saved checkpoint" in line]
    assert len(lines) == 3
    for line, (step, path) in zip(lines, sorted(checkpoint_steps(log_dir).items())):
        timings = r"in [0-9.]+ s \(training blocked for [0-9.]+ s\)$"
        assert re.search(rf"INFO .*{re.escape(str(path))} at step {step} {timings}", line)


def test_no_temp_files_after_run(base_run):
    log_dir, _, _ = base_run
    assert temp_files(log_dir / "checkpoints") == []


def test_config_file_with_overrides(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200, encoding="utf-8")
    config = write_config(
        tmp_path / "c.yaml", **TINY, steps=6, save_every_steps=3, data="corpus.txt"
    )
    result = run_trainer("--config", str(config), "--steps", "4", "--log-dir", "logs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    steps = checkpoint_steps(tmp_path / "logs")
    assert sorted(steps) == [3, 4]
    stored = load(steps[4])["config"]
    assert stored["steps"] == 4
    assert stored["save_every_steps"] == 3
    assert stored["data"] == str(corpus)
    assert stored["d_model"] == TINY["d_model"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("stpes: 10", "stpes"),
        ("steps: true", "steps"),
        ("steps: 0", "steps"),
        ("save_every_steps: -5", "save_every_steps"),
        ("lr: 1e-3", "lr"),
        ("dropout: 1.5", "dropout"),
        ("n_heads: 3", "n_heads"),
        ("seed: -1", "seed"),
        ("log_dir: 7", "log_dir"),
        ("- steps", "mapping"),
        ("steps: [", "YAML"),
    ],
)
def test_config_rejected(tmp_path, text, key):
    config = tmp_path / "bad.yaml"
    config.write_text(text + "\n", encoding="utf-8")
    # --steps 1 keeps the run short if a bad value is wrongly accepted. The file's own value
    # must be rejected even though the option overrides it.
    result = run_trainer("--config", str(config), "--steps", "1", "--log-dir", "logs", cwd=tmp_path)
    assert result.returncode == 2
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()


def test_option_rejected_names_option(tmp_path):
    result = run_trainer("--steps", "0", "--log-dir", "logs", cwd=tmp_path)
    assert result.returncode == 2
    assert "--steps" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_file_exit_2(tmp_path):
    result = run_trainer("--data", "missing.txt", "--log-dir", "logs", cwd=tmp_path)
    assert result.returncode == 2
    assert str(tmp_path / "missing.txt") in result.stderr
    assert "Traceback" not in result.stderr


def test_save_due_every_seconds():
    config = TrainConfig(steps=10, save_every_steps=5, save_every_seconds=0.5)
    run = types.SimpleNamespace(config=config, step=3)
    assert save_due(run, saved_time=-1e9)
    assert not save_due(run, saved_time=1e18)


def test_new_run_name_skips_used_second(tmp_path):
    used = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    (tmp_path / f"model_v2_step5_{used}_s3.pt").write_bytes(b"")
    name = new_run_name(tmp_path, seed=3)
    assert name != used
    assert name > used


def test_list_checkpoints_integer_order(tmp_path):
    names = [
        "model_v2_step9_20240101_000000_s0.pt",
        "model_v2_step100_20240101_000000_s0.pt",
        "model_v2_step10_20240101_000000_s0.pt",
        "model_v2_step10_20240102_000000_s0.pt",
        ".model_v2_step500_20240101_000000_s0.pt.tmp.12",
        "model_v2_step400_latest.pt",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    order = [file.path.name for file in list_checkpoints(tmp_path)]
    assert order == [names[1], names[3], names[2], names[0]]


def test_temp_name_outside_glob(tmp_path):
    temp = temp_path(tmp_path / "model_v2_step100_20240101_000000_s42.pt")
    assert not fnmatch.fnmatch(temp.name, CHECKPOINT_GLOB)
    assert temp.parent == tmp_path


def test_resume_continues_series(base_copy, base_run):
    run_name = NAME_PATTERN.fullmatch(checkpoint_steps(base_copy)[40].name)[2]
    result = run_trainer("--resume", "--steps", "50", "--log-dir", str(base_copy), cwd=base_copy)
    assert result.returncode == 0, result.stderr
    steps = checkpoint_steps(base_copy)
    assert sorted(steps) == [15, 30, 40, 45, 50]
    assert run_name in steps[50].name
    assert load(steps[50])["step"] == 50
    assert f"resuming run {run_name}" in result.stderr


def test_resume_removes_stale_temp_files(base_copy):
    folder = base_copy / "checkpoints"
    newest = checkpoint_steps(base_copy)[40]
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()  # its id names no running process now, as after a SIGKILL mid-save
    stale = folder / f".{newest.name.replace('step40', 'step41')}.tmp.{dead_pid.pid}"
    live = folder / f".{newest.name.replace('step40', 'step42')}.tmp.{os.getpid()}"
    other = folder / ".notes.tmp.1"
    for path in (stale, live, other):
        path.write_bytes(newest.read_bytes())
    before = {path: path.read_bytes() for path in checkpoint_steps(base_copy).values()}

    result = run_trainer("--resume", "--steps", "45", "--log-dir", str(base_copy), cwd=base_copy)

    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert live.exists(), "a temp file of a running process was removed"
    assert other.exists(), "a file not named like the trainer's temp files was removed"
    assert f"removed stale temp file {stale}" in result.stderr
    for path, data in before.items():
        assert path.read_bytes() == data


def test_resume_skips_corrupt_newest(base_copy):
    steps = checkpoint_steps(base_copy)
    corrupt = steps[40]
    corrupt.write_bytes(corrupt.read_bytes()[:1000])
    result = run_trainer("--resume", "--steps", "45", "--log-dir", str(base_copy), cwd=base_copy)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1
    assert corrupt.name in warnings[0]
    assert "at step 30" in result.stderr
    assert sorted(checkpoint_steps(base_copy)) == [15, 30, 40, 45]
    assert load(checkpoint_steps(base_copy)[45])["step"] == 45


def test_resume_empty_folder_starts_fresh(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", **TINY)
    result = run_trainer(
        "--config", str(config), "--resume", "--steps", "3", "--log-dir", "logs", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr
    assert "no loadable checkpoint" in result.stderr
    assert sorted(checkpoint_steps(tmp_path / "logs")) == [3]


def test_resume_other_seed_starts_fresh(base_copy):
    before = digests(base_copy / "checkpoints")
    config = write_config(base_copy.parent / "tiny.yaml", **TINY)
    result = run_trainer(
        "--config", str(config), "--resume", "--seed", "7", "--steps", "3",
        "--log-dir", str(base_copy), cwd=base_copy,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "no loadable checkpoint with seed 7" in result.stderr
    new = set(digests(base_copy / "checkpoints")) - set(before)
    assert len(new) == 1
    assert re.fullmatch(r"model_v2_step3_\d{8}_\d{6}_s7\.pt", new.pop())


def test_resume_conflict_exit_2(base_copy):
    result = run_trainer(
        "--resume", "--d-model", "64", "--steps", "41", "--log-dir", str(base_copy), cwd=base_copy
    )
    assert result.returncode == 2
    assert "d_model=32 (requested 64)" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_bitwise_exact(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", **TINY, dropout=0.1, save_every_steps=10)
    command = [sys.executable, "-m", "trainer", "--config", str(config), "--threads", "1"]
    straight = subprocess.Popen([*command, "--steps", "20", "--log-dir", "straight"], cwd=tmp_path)
    first = run_trainer(*command[3:], "--steps", "10", "--log-dir", "split", cwd=tmp_path)
    assert straight.wait(timeout=120) == 0
    assert first.returncode == 0, first.stderr
    second = run_trainer(*command[3:], "--resume", "--steps", "20", "--log-dir", "split",
                         cwd=tmp_path)  # fmt: skip
    assert second.returncode == 0, second.stderr

    expected = load(checkpoint_steps(tmp_path / "straight")[20])
    resumed = load(checkpoint_steps(tmp_path / "split")[20])
    for key, tensor in expected["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], resumed["optimizer"]["state"][index]["exp_avg"])


@pytest.mark.parametrize(
    ("signum", "status"),
    [pytest.param(signal.SIGTERM, 0, id="SIGTERM"), pytest.param(signal.SIGINT, 130, id="SIGINT")],
)
def test_stop_signal_saves_checkpoint(tmp_path, signum, status):
    config = write_config(tmp_path / "tiny.yaml", **{**TINY, "log_every": 1})
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer", "--config", str(config), "--steps", "1000000",
         "--save-every-steps", "1000000", "--log-dir", "logs"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = []
    for line in process.stderr:
        lines.append(line)
        if " step 3 loss " in line:
            break
    process.send_signal(signum)
    _, rest = process.communicate(timeout=60)
    log = "".join(lines) + rest
    assert process.returncode == status, log
    stopped = re.search(rf"received {signal.Signals(signum).name} at step (\d+)", log)
    assert stopped, log
    step = int(stopped[1])
    assert list(checkpoint_steps(tmp_path / "logs")) == [step]
    assert load(checkpoint_steps(tmp_path / "logs")[step])["step"] == step
    assert temp_files(tmp_path / "logs" / "checkpoints") == []


def assert_failed_save(result: subprocess.CompletedProcess, log_dir: Path, before, cause: str):
    folder = log_dir / "checkpoints"
    assert result.returncode == 1, result.stderr
    assert cause in result.stderr
    assert str(folder / "model_v2_step") in result.stderr
    assert "Traceback" not in result.stderr
    assert temp_files(folder) == []
    assert digests(folder) == before


def test_save_fails_file_size_limit(base_copy):
    before = digests(base_copy / "checkpoints")
    limit = min(p.stat().st_size for p in checkpoint_steps(base_copy).values()) // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run_trainer(
        "--resume", "--steps", "45", "--log-dir", str(base_copy), cwd=base_copy,
        preexec_fn=limit_file_size,
    )  # fmt: skip
    assert_failed_save(result, base_copy, before, "File too large")


@pytest.mark.parametrize(
    ("mode", "cause"), [("full", "No space left on device"), ("ro", "Read-only file system")]
)
def test_save_fails_on_tmpfs(base_run, tmpfs, mode, cause):
    log_dir = tmpfs / "logs"
    shutil.copytree(base_run[0], log_dir)
    before = digests(log_dir / "checkpoints")
    if mode == "full":
        stats = os.statvfs(tmpfs)
        used_kib = (stats.f_blocks - stats.f_bfree) * stats.f_frsize // 1024
        option = f"remount,size={used_kib + 64}k"
    else:
        option = "remount,ro"
    subprocess.run(["mount", "-o", option, str(tmpfs)], check=True)
    result = run_trainer("--resume", "--steps", "45", "--log-dir", str(log_dir), cwd=tmpfs)
    assert_failed_save(result, log_dir, before, cause)
