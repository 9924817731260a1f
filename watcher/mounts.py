"""Find the filesystem type of a folder, to choose polling where inotify cannot see writes."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

NETWORK_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "lustre",
        "ceph",
        "gpfs",
        "beegfs",
        "9p",
        "afs",
        "glusterfs",
        "ocfs2",
        "gfs2",
        "virtiofs",
    }
)
"""Filesystems shared between hosts: inotify never sees writes made by another host on them."""


def network_filesystem(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Return the type of the shared or FUSE filesystem that contains path, or None if it is local."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as file:
            text = file.read()
    except OSError as error:
        log.debug("cannot read %s (%s): assuming a local filesystem", mountinfo, error)
        return None
    fstype = filesystem_type(os.path.realpath(path), text)
    if fstype is not None and (fstype in NETWORK_TYPES or fstype.split(".")[0] == "fuse"):
        return fstype
    return None


def filesystem_type(path: str, mountinfo_text: str) -> str | None:
    """Return the type of the mount with the longest mount point that contains path."""
    best_point, best_type = "", None
    for line in mountinfo_text.splitlines():
        fields = line.split(" ")
        if "-" not in fields or len(fields) < 5:
            continue
        point = _unescape(fields[4])
        fstype = fields[fields.index("-") + 1] if fields.index("-") + 1 < len(fields) else None
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        # Later lines win on a tie, since a later mount on the same point hides the earlier one.
        if inside and len(point) >= len(best_point):
            best_point, best_type = point, fstype
    return best_type


def _unescape(field: str) -> str:
    """Undo the octal escapes (\\040 for a space) that mountinfo uses in paths."""
    if "\\" not in field:
        return field
    out, index = [], 0
    while index < len(field):
        if field[index] == "\\" and field[index + 1 : index + 4].isdigit():
            out.append(chr(int(field[index + 1 : index + 4], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)
