"""Smoke test of the benchmark scripts: each runs once at its --quick sizes and writes results.

No timing is asserted, because the figures depend on the machine. The test checks that each
script exits with status 0, writes its JSON result with the targets it evaluated, and removes
the folders it made.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from run_all import SCRIPTS  # bench/ is a folder of scripts, not a package


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_quick_run(name, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    results = tmp_path / "results"
    command = [sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick"]
    command += ["--tmp", str(scratch), "--results", str(results)]
    completed = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    data = json.loads((results / f"{name}.json").read_text())
    assert data["quick"] is True
    assert data["targets"]
    assert (results / f"{name}.md").read_text().startswith("## ")
    assert list(scratch.iterdir()) == []
