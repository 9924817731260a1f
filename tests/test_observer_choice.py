"""How the daemon picks its observer: network and FUSE mounts, and inotify limits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import Samples, save_atomically, wait_until

from watcher.mounts import filesystem_type, network_filesystem

RUN = "20251027_110846"


def ck(step: int) -> str:
    return f"model_v2_step{step}_{RUN}_s42.pt"


def steps_left(folder: Path) -> list[int]:
    names = [name for name in os.listdir(folder) if name.startswith("model_v2_step")]
    return sorted(int(name.split("_")[2][len("step") :]) for name in names)


MOUNTINFO = textwrap.dedent(
    r"""
    22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
    30 22 0:40 / /mnt/nfs rw,relatime - nfs4 server:/export rw,vers=4.2
    31 30 0:41 / /mnt/nfs/local rw,relatime - tmpfs tmpfs rw
    32 22 0:42 / /scratch rw,relatime shared:5 - lustre 10.0.0.1@tcp:/fs rw
    33 22 0:43 / /home/user/remote rw,nosuid - fuse.sshfs user@host:/ rw
    34 22 0:44 / /mnt/with\040space rw - cifs //host/share rw
    35 22 0:45 / /data rw - xfs /dev/sdb rw
    """
)

FILESYSTEM_CASES = [
    ("/", "ext4"),
    ("/mnt/nfs/run1/checkpoints", "nfs4"),
    ("/mnt/nfs/local/checkpoints", "tmpfs"),
    ("/mnt/nfsother", "ext4"),
    ("/scratch/ckpt", "lustre"),
    ("/home/user/remote/ckpt", "fuse.sshfs"),
    ("/mnt/with space/ckpt", "cifs"),
    ("/data", "xfs"),
]


@pytest.mark.parametrize("path, expected", FILESYSTEM_CASES)
def test_filesystem_type_from_mountinfo(path: str, expected: str) -> None:
    assert filesystem_type(path, MOUNTINFO) == expected


@pytest.mark.parametrize(
    "path, network",
    [
        ("/mnt/nfs/a", "nfs4"),
        ("/scratch", "lustre"),
        ("/home/user/remote/x", "fuse.sshfs"),
        ("/mnt/with space/x", "cifs"),
        ("/data/x", None),
        ("/mnt/nfs/local/x", None),
    ],
)
def test_network_filesystem_decision(tmp_path: Path, path: str, network: str | None) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)

    assert network_filesystem(path, str(mountinfo)) == network


def test_local_folder_uses_inotify(tmp_path: Path) -> None:
    assert network_filesystem(str(tmp_path)) is None


@pytest.fixture
def fuse_folder(tmp_path: Path):
    """A folder seen through a real FUSE mount (bindfs), unmounted at the end."""
    if shutil.which("bindfs") is None:
        pytest.skip("bindfs is not installed; .ci/run installs it for this test")
    source, mount = tmp_path / "source", tmp_path / "mount"
    source.mkdir()
    mount.mkdir()
    subprocess.run(["bindfs", str(source), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["fusermount", "-u", str(mount)], check=False)


def test_fuse_mount_switches_to_polling(fuse_folder: Path, samples: Samples, start_watcher) -> None:
    watcher = start_watcher(str(fuse_folder))
    assert watcher.wait_for_log("using the polling observer")
    assert watcher.wait_for_log("with the polling observer")

    for step in (1, 2, 3):
        save_atomically(fuse_folder / ck(step), samples.valid)

    assert wait_until(lambda: steps_left(fuse_folder) == [2, 3], timeout=15)
    assert watcher.stop() == 0


def test_no_polling_overrides_detection(fuse_folder: Path, start_watcher) -> None:
    watcher = start_watcher(str(fuse_folder), "--no-polling")

    assert watcher.wait_for_log("with the inotify observer")
    assert "using the polling observer" not in watcher.log
    assert watcher.stop() == 0


@pytest.mark.parametrize("limit", ["max_inotify_instances", "max_inotify_watches"])
def test_inotify_limit_falls_back_to_polling(
    folder_for_limits: Path, samples: Samples, start_watcher, limit: str
) -> None:
    """Start the watcher in a user namespace whose inotify limit is 0, as if it were exhausted.

    The limits in /proc/sys/user are per user namespace, so this leaves the rest of the machine
    alone. No instances gives EMFILE, no watches gives ENOSPC.
    """
    folder = folder_for_limits
    command = f"echo 0 > /proc/sys/user/{limit} && exec {sys.executable} -m watcher {folder}"
    watcher = start_watcher(wrapper=["unshare", "--user", "--map-root-user", "sh", "-c", command])
    assert watcher.wait_for_log("inotify limit reached")
    assert watcher.wait_for_log("with the polling observer")

    for step in (1, 2, 3):
        save_atomically(folder / ck(step), samples.valid)
    assert wait_until(lambda: steps_left(folder) == [2, 3], timeout=15)
    assert watcher.stop() == 0


@pytest.fixture
def folder_for_limits(tmp_path: Path) -> Path:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    return folder
