"""The built wheel: every module is in it, and the installed watcher runs without the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO, Samples, write_file


def test_wheel_installs_a_working_watcher(tmp_path: Path, samples: Samples) -> None:
    # Build from a clean copy: an egg-info folder left by an editable install makes setuptools
    # add the files it lists, which would hide a package missing from pyproject.toml.
    source_tree = tmp_path / "source"
    shutil.copytree(
        REPO,
        source_tree,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            ".hypothesis",
            "results",
        ),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(source_tree)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("ckpt_watcher-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    for source in [*REPO.glob("watcher/**/*.py"), *REPO.glob("trainer/**/*.py")]:
        assert source.relative_to(REPO).as_posix() in packaged, f"{source} is not in the wheel"

    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in (1, 2, 3):
        write_file(folder / f"model_v2_step{step}_run_s1.pt", samples.valid)
    code = (
        "import sys, watcher; from watcher.cli import main; "
        f"assert watcher.__file__.startswith({str(target)!r}), watcher.__file__; "
        f"sys.exit(main([{str(folder)!r}, '--once']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in folder.glob("model_v2_step*")) == [
        "model_v2_step2_run_s1.pt",
        "model_v2_step3_run_s1.pt",
    ]
