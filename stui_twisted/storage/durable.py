"""POSIX durability: how bytes reach the disk so that a crash never loses an acknowledged write.

A write is: temp file in the same directory, write, fsync, hard-link the old file to
C{.bak} (atomically, via a temp name), rename the temp file over the file, fsync the
directory.  This module also creates directories (0700, parent fsynced) and moves
unreadable files into quarantine.  Blocking calls only: the store runs them in its
threads.  Other modules call these functions through the module
(C{durable.fsync_dir(...)}), so a test can count or fail them in one place.
"""

from __future__ import annotations

import errno
import os
import secrets
import uuid
from collections.abc import Iterable

from stui_twisted.storage.errors import storage_failure
from stui_twisted.storage.fileformat import FILE_MODE, OPEN_CREATE_FLAGS, OPEN_READ_FLAGS, write_all

DIR_MODE = 0o700

_LINK_UNSUPPORTED = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


def fsync_dir(path: str) -> None:
    """fsync the directory C{path}, so the names in it last."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: str) -> None:
    """Remove a temp file of ours that may or may not exist."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return


def temp_name(path: str) -> str:
    """A fresh hidden temp name beside C{path}."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{secrets.token_hex(6)}")


def write_temp(path: str, data: bytes) -> str:
    """Write C{data} to a fresh 0600 temp file beside C{path}, fsync it, return its name."""
    temp_path = temp_name(path)
    fd = os.open(temp_path, OPEN_CREATE_FLAGS, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        remove_quietly(temp_path)
        raise
    os.close(fd)
    return temp_path


def keep_backup(path: str) -> None:
    """Make C{path}.bak the current C{path} (if any), replacing the old backup atomically."""
    backup_path = path + ".bak"
    temp_path = temp_name(backup_path)
    try:
        os.link(path, temp_path)
    except FileNotFoundError:
        return  # first version: nothing to keep
    except OSError as exc:
        if exc.errno not in _LINK_UNSUPPORTED:
            raise
        with open(path, "rb") as current:
            temp_path_written = write_temp(backup_path, current.read())
        os.replace(temp_path_written, backup_path)
        return
    try:
        os.replace(temp_path, backup_path)
    except BaseException:
        remove_quietly(temp_path)
        raise


def commit_temp(temp_path: str, path: str, *, backup: bool) -> None:
    """Keep the old C{path} as .bak (if C{backup}) and rename C{temp_path} over it.

    The temp file is removed if this fails.  The directory is not fsynced.
    """
    try:
        if backup:
            keep_backup(path)
        os.replace(temp_path, path)
    except BaseException:
        remove_quietly(temp_path)
        raise


def durable_replace(path: str, data: bytes, *, backup: bool, sync_dir: bool) -> None:
    """Temp file → write → fsync → keep old as .bak → rename over C{path} → fsync dir."""
    commit_temp(write_temp(path, data), path, backup=backup)
    if sync_dir:
        fsync_dir(os.path.dirname(path))


def read_bytes(path: str) -> bytes:
    """The bytes of C{path}, never following a symlink."""
    fd = os.open(path, OPEN_READ_FLAGS)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def ensure_dir(path: str, parent_to_sync: str | None = None) -> None:
    """Create C{path} with mode 0700 if missing (fsyncing its parent so it lasts)."""
    if os.path.isdir(path):
        return
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    os.chmod(path, DIR_MODE)
    if parent_to_sync is not None:
        fsync_dir(parent_to_sync)


def remove_file_and_backup(path: str) -> None:
    """Remove C{path} and C{path}.bak (missing is fine), then fsync their directory.

    @raise FileNotFoundError: the directory itself does not exist.
    """
    for name in (path, path + ".bak"):
        try:
            os.unlink(name)
        except FileNotFoundError:
            continue
    fsync_dir(os.path.dirname(path))


def quarantine_move(path: str, data_dir: str, quarantine_dir: str, stamp: str) -> str:
    """Move C{path} into C{quarantine_dir} under a unique name; return the new path.

    The name is C{<stamp>-<12 hex>-<directory relative to data_dir, "/" as "__">-<name>}
    (what C{stui-admin quarantine} parses back).

    @raise StorageFailure: the move failed.
    """
    relative = os.path.relpath(os.path.dirname(path), data_dir).replace(os.sep, "__")
    name = f"{stamp}-{uuid.uuid4().hex[:12]}-{relative[:100]}-{os.path.basename(path)}"
    destination = os.path.join(quarantine_dir, name)
    try:
        os.rename(path, destination)
        fsync_dir(quarantine_dir)
        fsync_dir(os.path.dirname(path))
    except OSError as exc:
        raise storage_failure("quarantine", path, exc) from exc
    return destination


def listdir(path: str) -> Iterable[str]:
    """The names in C{path}; none if it does not exist."""
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
