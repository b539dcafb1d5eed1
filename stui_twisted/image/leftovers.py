"""Processes a previous image left behind when the server itself was killed.

When the server dies by SIGKILL its image dies with it (the kernel's parent-death
signal), but processes that user code started in the image (C{subprocess.Popen},
C{os.system('... &')}, C{os.fork()}) live on, reparented to init: nothing is left
to kill their process group.  So each image is started with a random tag in its
environment, which every process it starts inherits, and the tag and the
image's process group are written to a small file in the data directory.  At the
next start the supervisor kills the processes of that group that carry that tag,
and only those: a process group id can be reused by an unrelated program once the
group is empty, but such a program does not carry the tag.  Linux only (C{/proc}).
"""

from __future__ import annotations

import os
import secrets
import signal

TAG_VARIABLE = "STUI_IMAGE_TAG"
STATE_FILE = "image-group"


def new_tag() -> str:
    """A fresh, unguessable tag for one image."""
    return secrets.token_hex(16)


def remember(state_dir: str, pgid: int, tag: str) -> None:
    """Write C{pgid} and C{tag} to the state file (mode 0600), replacing it."""
    path = os.path.join(state_dir, STATE_FILE)
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{pgid} {tag}\n".encode("ascii"))
    finally:
        os.close(fd)
    os.replace(temporary, path)


def _recorded(state_dir: str) -> tuple[int, str] | None:
    try:
        with open(os.path.join(state_dir, STATE_FILE), encoding="ascii") as state:
            pgid, tag = state.read().split()
        return int(pgid), tag
    except (OSError, ValueError):
        return None


def _group_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def _carries(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return marker in environ.read().split(b"\0")
    except OSError:
        return False


def kill_leftovers(state_dir: str) -> list[int]:
    """Kill what the last recorded image left behind; answer the pids killed."""
    recorded = _recorded(state_dir)
    if recorded is None or not os.path.isdir("/proc"):
        return []
    pgid, tag = recorded
    marker = f"{TAG_VARIABLE}={tag}".encode("ascii")
    killed = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == os.getpid() or _group_of(pid) != pgid or not _carries(pid, marker):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
        killed.append(pid)
    return killed
