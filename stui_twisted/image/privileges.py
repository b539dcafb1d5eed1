"""Privilege separation for the image: run user code as another OS user.

With C{--image-user=USER} the supervisor spawns the image with USER's uid and
gid (and its supplementary groups), in C{/}, with USER's C{HOME}.  User code
then cannot read the data directory (C{0700}, owned by the server's user) or
its C{secret.key}, and cannot signal the server.  Switching needs root, or the
capabilities C{CAP_SETUID} and C{CAP_SETGID} (and C{CAP_KILL}, to kill the
image's process group); both are checked when the option is read, so a server
that cannot do it refuses to start instead of running user code as itself.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
NEEDED_CAPABILITIES = {"CAP_KILL": CAP_KILL, "CAP_SETGID": CAP_SETGID, "CAP_SETUID": CAP_SETUID}


class PrivilegeError(Exception):
    """The image cannot be run as the user asked for; the message says why."""


@dataclass(frozen=True)
class ImageAccount:
    """The OS account the image runs as."""

    name: str
    uid: int
    gid: int
    home: str


def lookup(user: str) -> ImageAccount:
    """The account named C{user} (a name or a numeric uid)."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise PrivilegeError(f"there is no user {user!r} on this machine") from None
    return ImageAccount(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir or "/")


def _effective_capabilities() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        return 0
    return 0


def check_can_switch_to(user: str) -> ImageAccount:
    """The account, if this process can start the image as it; else L{PrivilegeError}."""
    account = lookup(user)
    if account.uid == os.geteuid():
        raise PrivilegeError(
            f"{account.name!r} is the server's own user: the image would not be separated"
        )
    if account.uid == 0:
        raise PrivilegeError("the image must not run as root")
    if os.geteuid() != 0:
        capabilities = _effective_capabilities()
        missing = [name for name, bit in NEEDED_CAPABILITIES.items() if not capabilities >> bit & 1]
        if missing:
            raise PrivilegeError(
                f"running the image as {account.name!r} needs the server to start as root or "
                f"with {', '.join(sorted(NEEDED_CAPABILITIES))} (missing: {', '.join(missing)})"
            )
    return account


def check_private(path: str, account: ImageAccount) -> None:
    """Refuse a data directory that C{account} owns (it could read every session)."""
    try:
        owner = os.stat(path).st_uid
    except FileNotFoundError:
        return  # the store creates it, owned by the server's user, mode 0700
    if owner == account.uid:
        raise PrivilegeError(
            f"the data directory {path} belongs to {account.name!r}, the image's user: "
            "user code could read every session; give it to the server's user"
        )
