"""The systemd unit: syntax checked by systemd-analyze, hardening scored against a threshold."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

UNIT = REPO / "systemd" / "ckpt-watcher@.service"
SHIPPED_BINARY = "/opt/ckpt-watcher/bin/ckpt-watcher"
EXPOSURE_THRESHOLD = 15
"""Highest accepted exposure score times ten (1.5 of 10, rated SAFE by systemd-analyze)."""

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this environment's ckpt-watcher.

    systemd-analyze checks that the ExecStart binary exists, and the shipped path belongs to the
    installation that the README describes.
    """
    binary = Path(sys.executable).with_name("ckpt-watcher")
    assert binary.exists(), f"{binary} is missing: install the project with pip first"
    text = UNIT.read_text()
    assert SHIPPED_BINARY in text
    path = tmp_path / "ckpt-watcher@.service"
    path.write_text(text.replace(SHIPPED_BINARY, str(binary)))
    return tmp_path / "ckpt-watcher@test.service"


def test_unit_verifies_cleanly(unit_copy: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit_copy)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_unit_hardening_score(unit_copy: Path) -> None:
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            f"--threshold={EXPOSURE_THRESHOLD}",
            str(unit_copy),
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stdout[-2000:]
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert score is not None, result.stdout[-2000:]
    assert float(score.group(1)) * 10 <= EXPOSURE_THRESHOLD


def test_unit_settings() -> None:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)

    assert settings["Type"] == ["notify"]
    assert settings["Restart"] == ["on-failure"]
    assert "/etc/ckpt-watcher/%i.yaml" in settings["ExecStart"][0]
    assert settings["User"] == ["ckpt-watcher"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert settings["PrivateNetwork"] == ["yes"]
    assert "WatchdogSec" in settings
