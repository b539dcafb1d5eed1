"""The password file behind C{--auth-file}: its format, its hashes, and C{stui-passwd}.

Format: UTF-8 text, one user per line, blank lines and lines starting with C{#}
ignored::

    # stui-twisted users
    alice:scrypt$16384$8$1$<salt, base64>$<key, base64>

The hash part never contains C{:} (decimal numbers and standard base64), so a
line is split on its *last* C{:}.  That keeps every name allowed as a
C{client_id} usable here, C{:} included (C{team:alice} is a valid user).
Usernames follow the C{client_id} rule of protocol.md section 7: 1-128
characters of C{A-Z a-z 0-9 . _ : @ -} starting with a letter or digit.

Hashes are C{hashlib.scrypt} with a random 16-byte salt and a 32-byte key;
the cost parameters are stored per line, so they can be raised later without
invalidating old entries.  This module does blocking work only (hashing, file
I/O): the server calls it from a thread pool (see L{stui_twisted.access.auth}).

Run as C{python -m stui_twisted.access.passwd FILE USER [--delete]} (or
C{stui-passwd}) to add, change or delete a user.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import getpass
import hashlib
import hmac
import os
import re
import secrets
import stat
import sys
import tempfile
from collections.abc import Iterator

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32

# Sanity bounds for parameters read from a file: an entry that would need more
# than this much memory or time is rejected as malformed instead of being run.
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16
_MAX_SCRYPT_MEMORY = 256 * 1024 * 1024

USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z")

SCHEME = "scrypt"


class PasswordFileError(Exception):
    """The password file is missing, unreadable, or cannot be written."""


def valid_username(name: object) -> bool:
    """Whether C{name} is a string that follows the C{client_id} rule."""
    return isinstance(name, str) and USERNAME_RE.match(name) is not None


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    """One scrypt derivation (a module-level seam so tests can count calls)."""
    maxmem = 128 * r * (n + p + 2) + 1024 * 1024
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _password_bytes(password: str | bytes) -> bytes:
    if isinstance(password, bytes):
        return password
    # Lone surrogates can arrive from JSON ("\ud800"); hash them rather than crash.
    return password.encode("utf-8", "surrogatepass")


@dataclasses.dataclass(frozen=True)
class PasswordHash:
    """One parsed C{scrypt$n$r$p$salt$key} entry."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @classmethod
    def new(
        cls,
        password: str | bytes,
        *,
        n: int = SCRYPT_N,
        r: int = SCRYPT_R,
        p: int = SCRYPT_P,
        salt: bytes | None = None,
    ) -> PasswordHash:
        """Hash C{password} with a fresh random salt (blocking, ~50 ms by default)."""
        _check_params(n, r, p)
        if salt is None:
            salt = secrets.token_bytes(SALT_BYTES)
        key = _scrypt(_password_bytes(password), salt, n, r, p, KEY_BYTES)
        return cls(n, r, p, salt, key)

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Parse the part after the username; raise C{ValueError} naming the problem."""
        fields = text.split("$")
        if len(fields) != 6 or fields[0] != SCHEME:
            raise ValueError("hash is not of the form scrypt$N$r$p$salt$key")
        try:
            n, r, p = (int(f, 10) for f in fields[1:4])
        except ValueError:
            raise ValueError("scrypt parameters N, r, p must be decimal integers") from None
        _check_params(n, r, p)
        try:
            salt = _b64decode(fields[4])
            key = _b64decode(fields[5])
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("salt and key must be standard base64") from None
        if not salt or len(key) < 16:
            raise ValueError("salt is empty or key is shorter than 16 bytes")
        return cls(n, r, p, salt, key)

    def encode(self) -> str:
        """The text form stored in the file."""
        salt = base64.b64encode(self.salt).decode("ascii")
        key = base64.b64encode(self.key).decode("ascii")
        return f"{SCHEME}${self.n}${self.r}${self.p}${salt}${key}"

    def verify(self, password: str | bytes) -> bool:
        """Whether C{password} matches (blocking; constant-time comparison)."""
        candidate = _scrypt(
            _password_bytes(password), self.salt, self.n, self.r, self.p, len(self.key)
        )
        return hmac.compare_digest(candidate, self.key)


def _check_params(n: int, r: int, p: int) -> None:
    if n < 2 or n > _MAX_N or n & (n - 1):
        raise ValueError(f"scrypt N must be a power of two between 2 and {_MAX_N}")
    if not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P:
        raise ValueError(f"scrypt r must be 1..{_MAX_R} and p 1..{_MAX_P}")
    if 128 * r * n > _MAX_SCRYPT_MEMORY:
        raise ValueError("scrypt parameters need more than 256 MiB of memory")


def hash_password(password: str | bytes, **params: int) -> str:
    """The stored text form of a fresh hash of C{password}."""
    return PasswordHash.new(password, **params).encode()


def verify_password(password: str | bytes, encoded: str) -> bool:
    """Whether C{password} matches the stored text form C{encoded}."""
    return PasswordHash.parse(encoded).verify(password)


def split_line(line: str) -> tuple[str, str] | None:
    """C{(username, hash_text)} of a user line, or C{None} for blank/comment lines.

    Splits on the last C{:} (the hash part never contains one).  Raises
    C{ValueError} when the line is not C{user:hash}.
    """
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    username, sep, hash_text = stripped.rpartition(":")
    if not sep or not username:
        raise ValueError("line is not of the form username:scrypt$...")
    return username, hash_text


def parse_password_file(text: str) -> tuple[dict[str, PasswordHash], list[str]]:
    """Parse a whole file: C{(users, problems)}.

    Malformed lines are skipped (that user cannot log in) and described in
    C{problems} with their line number, so the caller can log them.  When a
    username appears twice, the last line wins and a problem is reported.
    """
    users: dict[str, PasswordHash] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            parsed = split_line(line)
            if parsed is None:
                continue
            username, hash_text = parsed
            if not valid_username(username):
                raise ValueError(f"username {username[:40]!r} breaks the client_id rule")
            entry = PasswordHash.parse(hash_text)
        except ValueError as e:
            problems.append(f"line {number}: {e}; skipped")
            continue
        if username in users:
            problems.append(f"line {number}: user {username!r} appears again; the last line wins")
        users[username] = entry
    return users, problems


def read_text(path: str) -> tuple[str, os.stat_result]:
    """The file's text and the C{stat} of the opened file (blocking)."""
    try:
        with open(path, encoding="utf-8") as f:
            st = os.fstat(f.fileno())
            return f.read(), st
    except (OSError, UnicodeDecodeError) as e:
        raise PasswordFileError(f"cannot read password file {path!r}: {e}") from e


def too_permissive(st: os.stat_result) -> bool:
    """Whether the file is readable by its group or by everyone."""
    return bool(st.st_mode & (stat.S_IRGRP | stat.S_IROTH))


# -- updating the file ----------------------------------------------------------------


def _user_lines(lines: list[str], username: str) -> Iterator[int]:
    for index, line in enumerate(lines):
        try:
            parsed = split_line(line)
        except ValueError:
            continue
        if parsed is not None and parsed[0] == username:
            yield index


def set_user(lines: list[str], username: str, encoded: str) -> tuple[list[str], bool]:
    """C{(new_lines, existed)}: C{username}'s line replaced, or appended when new.

    Comments, order and lines this code cannot parse are kept unchanged.
    """
    entry = f"{username}:{encoded}\n"
    indexes = list(_user_lines(lines, username))
    if not indexes:
        new = list(lines)
        if new and not new[-1].endswith("\n"):
            new[-1] += "\n"
        return new + [entry], False
    first, *rest = indexes
    new = [entry if i == first else line for i, line in enumerate(lines) if i not in rest]
    return new, True


def delete_user(lines: list[str], username: str) -> tuple[list[str], bool]:
    """C{(new_lines, existed)}: every line of C{username} removed."""
    indexes = set(_user_lines(lines, username))
    return [line for i, line in enumerate(lines) if i not in indexes], bool(indexes)


def write_atomically(path: str, lines: list[str]) -> None:
    """Replace C{path} with C{lines}: temp file in the same directory, fsync, rename.

    A new file is created 0600.  An existing file keeps its permission bits and,
    when the caller may set them (root), its owner and group, so a root
    administrator does not make the file unreadable for the server's user.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(prefix=".stui-passwd-", dir=directory)  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            if old is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Serialize concurrent C{stui-passwd} runs on one file (C{FILE.lock}, flock)."""
    import fcntl

    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- the command ----------------------------------------------------------------------

EXIT_OK = 0
EXIT_FAILURE = 1  # the file could not be read/written, user not found, passwords differ
EXIT_USAGE = 2  # bad arguments (argparse uses 2 as well)


def _read_password(stdin) -> str:
    """Ask twice on a terminal; otherwise read one line from stdin."""
    if stdin.isatty():
        first = getpass.getpass("New password: ")
        second = getpass.getpass("Re-type new password: ")
        if first != second:
            raise _CommandError("passwords do not match; nothing changed", EXIT_FAILURE)
        return first
    line = stdin.readline()
    return line.removesuffix("\n").removesuffix("\r")


class _CommandError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stui-passwd",
        description=(
            "Add, change or delete a user of a stui-twisted password file "
            "(--auth-file).  The password is asked twice on a terminal, or read "
            "as one line from standard input otherwise."
        ),
        epilog="Exit status: 0 done, 1 failed (nothing changed), 2 bad arguments.",
    )
    parser.add_argument("file", metavar="FILE", help="the password file (created 0600)")
    parser.add_argument("user", metavar="USER", help="the username (its client_id)")
    parser.add_argument("--delete", action="store_true", help="remove USER from FILE")
    return parser


def run(argv: list[str] | None = None, stdin=None) -> int:
    """The command's logic; returns the exit status."""
    args = _parser().parse_args(argv)
    stdin = sys.stdin if stdin is None else stdin
    if not valid_username(args.user):
        raise _CommandError(
            f"invalid username {args.user!r}: use 1-128 characters of "
            "A-Z a-z 0-9 . _ : @ - starting with a letter or digit",
            EXIT_USAGE,
        )
    exists = os.path.exists(args.file)
    if args.delete and not exists:
        raise _CommandError(f"{args.file}: no such file; nothing to delete", EXIT_FAILURE)
    password = None
    if not args.delete:
        password = _read_password(stdin)
        if not password:
            raise _CommandError("empty password refused; nothing changed", EXIT_FAILURE)
    try:
        with _locked(args.file):
            lines: list[str] = []
            if os.path.exists(args.file):
                text, st = read_text(args.file)
                lines = text.splitlines(keepends=True)
                if too_permissive(st):
                    print(
                        f"stui-passwd: warning: {args.file} is readable by group or others;"
                        f" consider chmod 600 {args.file}",
                        file=sys.stderr,
                    )
            if args.delete:
                lines, existed = delete_user(lines, args.user)
                if not existed:
                    raise _CommandError(
                        f"user {args.user!r} not found in {args.file}", EXIT_FAILURE
                    )
                verb = "Deleted"
            else:
                lines, existed = set_user(lines, args.user, hash_password(password))
                verb = "Updated password for" if existed else "Added"
            write_atomically(args.file, lines)
    except (OSError, PasswordFileError) as e:
        raise _CommandError(f"{args.file}: {e}; nothing changed", EXIT_FAILURE) from e
    print(f"{verb} user {args.user} in {args.file}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of C{stui-passwd} and C{python -m stui_twisted.access.passwd}."""
    try:
        return run(argv)
    except _CommandError as e:
        print(f"stui-passwd: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("stui-passwd: interrupted; nothing changed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
