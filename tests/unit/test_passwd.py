"""Tests for the password file format, scrypt hashing, and the ``stui-passwd`` command."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stui_twisted.access import passwd
from stui_twisted.access.passwd import (
    PasswordHash,
    delete_user,
    hash_password,
    parse_password_file,
    set_user,
    valid_username,
    verify_password,
)

FAST = {"n": 2**10, "r": 8, "p": 1}

# -- hashing --------------------------------------------------------------------------


def test_hash_format_and_verify():
    encoded = hash_password("correct horse")
    scheme, n, r, p, salt, key = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    entry = PasswordHash.parse(encoded)
    assert len(entry.salt) == 16 and len(entry.key) == 32
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horsE", encoded)
    assert not verify_password("", encoded)


def test_salt_is_random():
    assert hash_password("same", **FAST) != hash_password("same", **FAST)


def test_non_ascii_and_surrogate_passwords():
    encoded = hash_password("pässwörd", **FAST)
    assert verify_password("pässwörd", encoded)
    assert verify_password("pässwörd".encode(), encoded)
    lone = hash_password("\ud800x", **FAST)
    assert verify_password("\ud800x", lone)
    assert not verify_password("x", lone)


@pytest.mark.parametrize(
    "text",
    [
        "pbkdf2$1$2$3$AAAA$AAAA",
        "scrypt$16384$8$1$AAAA",
        "scrypt$16385$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,
        "scrypt$2097152$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,
        "scrypt$16384$x$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,
        "scrypt$16384$8$1$not base64!$" + "A" * 44,
        "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAA",
    ],
)
def test_parse_rejects_malformed_hashes(text):
    with pytest.raises(ValueError):
        PasswordHash.parse(text)


def test_encode_parse_round_trip():
    entry = PasswordHash.new("pw", **FAST)
    assert PasswordHash.parse(entry.encode()) == entry


@pytest.mark.parametrize(
    "name", ["alice", "a", "team:alice", "bob@example.org", "x-1.2_3", "a" * 128]
)
def test_valid_usernames(name):
    assert valid_username(name)


@pytest.mark.parametrize("name", ["", "-alice", ":x", "a b", "a" * 129, "é", "a\n", None, 3])
def test_invalid_usernames(name):
    assert not valid_username(name)


# -- file format ----------------------------------------------------------------------


def test_parse_file_comments_colons_and_problems():
    a = hash_password("a", **FAST)
    b = hash_password("b", **FAST)
    text = "\n".join(
        [
            "# users",
            "",
            f"alice:{a}",
            f"team:bob:{b}",  # ':' in a username: split on the last one
            "garbage line",
            f"-bad:{a}",
            "carol:scrypt$1$2",
            f"alice:{b}",  # duplicate, last wins
        ]
    )
    users, problems = parse_password_file(text)
    assert set(users) == {"alice", "team:bob"}
    assert users["team:bob"].verify("b")
    assert users["alice"].verify("b")
    assert [p.split(":")[0] for p in problems] == ["line 5", "line 6", "line 7", "line 8"]


def test_set_and_delete_user_keep_other_lines():
    lines = ["# header\n", "alice:old\n", "unparsable\n", "bob:x"]
    new, existed = set_user(lines, "alice", "NEW")
    assert existed and new == ["# header\n", "alice:NEW\n", "unparsable\n", "bob:x"]
    new, existed = set_user(lines, "carol", "C")
    assert not existed and new[-2:] == ["bob:x\n", "carol:C\n"]
    new, existed = delete_user(lines, "alice")
    assert existed and new == ["# header\n", "unparsable\n", "bob:x"]
    assert delete_user(lines, "nobody") == (lines, False)


# -- the command ----------------------------------------------------------------------


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stui_twisted.access.passwd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def read_users(path) -> dict[str, PasswordHash]:
    users, problems = parse_password_file(path.read_text())
    assert problems == []
    return users


def test_cli_creates_file_0600(tmp_path):
    path = tmp_path / "users"
    result = run_cli(str(path), "alice", stdin="s3cret\n")
    assert result.returncode == 0, result.stderr
    assert "Added user alice" in result.stdout
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    users = read_users(path)
    assert list(users) == ["alice"]
    assert users["alice"].verify("s3cret")
    assert not users["alice"].verify("s3cret\n")


def test_cli_updates_atomically_and_keeps_the_rest(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"# our team\nbob:{hash_password('b', **FAST)}\n")
    os.chmod(path, 0o640)
    assert run_cli(str(path), "team:alice", stdin="one\n").returncode == 0
    inode = os.stat(path).st_ino
    result = run_cli(str(path), "team:alice", stdin="two\r\n")
    assert result.returncode == 0, result.stderr
    assert "Updated password for user team:alice" in result.stdout
    assert "readable by group" in result.stderr  # 0640 is kept, but warned about
    assert os.stat(path).st_ino != inode  # replaced by rename, not rewritten in place
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert path.read_text().startswith("# our team\nbob:")
    users = read_users(path)
    assert set(users) == {"bob", "team:alice"}
    assert users["team:alice"].verify("two")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".stui-passwd-")] == []


def test_cli_delete(tmp_path):
    path = tmp_path / "users"
    run_cli(str(path), "alice", stdin="a\n")
    run_cli(str(path), "bob", stdin="b\n")
    result = run_cli(str(path), "alice", "--delete")
    assert result.returncode == 0, result.stderr
    assert "Deleted user alice" in result.stdout
    assert set(read_users(path)) == {"bob"}
    again = run_cli(str(path), "alice", "--delete")
    assert again.returncode == 1
    assert "user 'alice' not found" in again.stderr


def test_cli_delete_without_file(tmp_path):
    result = run_cli(str(tmp_path / "nope"), "alice", "--delete")
    assert result.returncode == 1
    assert "no such file" in result.stderr
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("name", ["-x", "a b", "bad/name", "a" * 129])
def test_cli_bad_username(tmp_path, name):
    path = tmp_path / "users"
    result = run_cli("--", str(path), name, stdin="pw\n")
    assert result.returncode == 2
    assert "invalid username" in result.stderr
    assert not path.exists()


def test_cli_empty_password_refused(tmp_path):
    path = tmp_path / "users"
    result = run_cli(str(path), "alice", stdin="\n")
    assert result.returncode == 1
    assert "empty password" in result.stderr
    assert not path.exists()


def test_cli_usage_errors():
    result = run_cli()
    assert result.returncode == 2
    assert "usage: stui-passwd" in result.stderr
    assert run_cli("--help").returncode == 0


def test_cli_unwritable_directory(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "ro"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        result = run_cli(str(locked / "users"), "alice", stdin="pw\n")
    finally:
        os.chmod(locked, 0o700)
    assert result.returncode == 1
    assert "nothing changed" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_in_process_tty_prompts_twice(tmp_path, monkeypatch):
    answers = iter(["pw1", "pw2"])
    monkeypatch.setattr(passwd.getpass, "getpass", lambda prompt: next(answers))

    class Tty:
        def isatty(self):
            return True

    with pytest.raises(passwd._CommandError, match="do not match"):
        passwd.run([str(tmp_path / "u"), "alice"], stdin=Tty())
    assert not (tmp_path / "u").exists()

    answers = iter(["same", "same"])
    assert passwd.run([str(tmp_path / "u"), "alice"], stdin=Tty()) == 0
    assert read_users(tmp_path / "u")["alice"].verify("same")


def test_cli_file_is_a_directory(tmp_path):
    result = run_cli(str(tmp_path), "alice", stdin="pw\n")
    assert result.returncode == 1
    assert "cannot read password file" in result.stderr
    assert "Traceback" not in result.stderr


USERNAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(
    names=st.lists(USERNAMES, min_size=1, max_size=4, unique=True), password=st.text(max_size=40)
)
def test_any_valid_username_round_trips_through_the_file(names, password):
    lines: list[str] = ["# header\n"]
    for name in names:
        lines, existed = set_user(lines, name, hash_password(password, **FAST))
        assert not existed
    users, problems = parse_password_file("".join(lines))
    assert problems == []
    assert list(users) == names
    assert all(users[name].verify(password) for name in names)
    lines, existed = delete_user(lines, names[0])
    assert existed
    assert list(parse_password_file("".join(lines))[0]) == names[1:]
