"""Tests for the authentication core: cred checker, realm, Authenticator, tokens, limits.

Most tests run the "thread pool" synchronously (L{SyncPool}) and drive time with
C{task.Clock}, so they are deterministic; one test uses the real reactor and a
real thread pool to show hashing happens off the reactor thread.
"""

from __future__ import annotations

import os
import re
import threading

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from stui_twisted.access import auth, passwd
from stui_twisted.access.auth import (
    Authenticator,
    ClientIdRealm,
    IClientId,
    PasswordFileChecker,
    Principal,
    iso_utc,
)
from stui_twisted.access.passwd import PasswordFileError, hash_password
from stui_twisted.protocol.errors import StuiError
from stui_twisted.settings import Settings
from tests.helpers import SyncPool, write_users

FAST = {"n": 2**10, "r": 8, "p": 1}
ISO_MS_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


class ManualPool:
    """A thread pool stand-in that runs queued work only when told to."""

    def __init__(self):
        self.queue = []

    def callInThreadWithCallback(self, onResult, func, *args, **kw):
        self.queue.append((onResult, func, args, kw))

    def run_all(self):
        queue, self.queue = self.queue, []
        for onResult, func, args, kw in queue:
            SyncPool().callInThreadWithCallback(onResult, func, *args, **kw)


class SyncReactor:
    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)


def result_of(d):
    results = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def stui_error_of(d) -> StuiError:
    with pytest.raises(StuiError) as info:
        result_of(d)
    return info.value


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users"
    write_users(path, alice="wonderland", bob="builder", team__carol="c")
    return path


@pytest.fixture
def scrypt_calls(monkeypatch):
    calls = []
    real = passwd._scrypt

    def counting(password, salt, n, r, p, dklen):
        calls.append({"n": n, "r": r, "p": p, "dklen": dklen, "thread": threading.get_ident()})
        return real(password, salt, n, r, p, dklen)

    monkeypatch.setattr(passwd, "_scrypt", counting)
    return calls


def make_auth(users_file, clock=None, pool=None, **settings) -> Authenticator:
    defaults = {
        "auth_file": str(users_file),
        "auth_failures_per_peer": 100,
        "auth_failures_per_user": 100,
        "auth_failure_window": 60.0,
        "token_ttl": 3600.0,
    }
    defaults.update(settings)
    return Authenticator(
        Settings(**defaults),
        clock or task.Clock(),
        reactor=SyncReactor(),
        threadpool=pool or SyncPool(),
    )


def login(authenticator, username, password, peer="10.0.0.1"):
    return defer.ensureDeferred(authenticator.authenticate(username, password, peer))


# -- twisted.cred pieces --------------------------------------------------------------


def test_portal_login_returns_principal(users_file):
    authenticator = make_auth(users_file)
    d = authenticator.portal.login(UsernamePassword(b"alice", b"wonderland"), None, IClientId)
    iface, avatar, logout = result_of(d)
    assert iface is IClientId and avatar == Principal("alice")
    assert IClientId.providedBy(avatar)
    logout()


def test_checker_rejects_wrong_password_and_unknown_user(users_file):
    checker = PasswordFileChecker(str(users_file), reactor=SyncReactor(), threadpool=SyncPool())
    assert result_of(checker.requestAvatarId(UsernamePassword(b"bob", b"builder"))) == "bob"
    for creds in (UsernamePassword(b"bob", b"nope"), UsernamePassword(b"mallory", b"builder")):
        with pytest.raises(UnauthorizedLogin):
            result_of(checker.requestAvatarId(creds))


def test_realm_refuses_other_interfaces():
    with pytest.raises(NotImplementedError):
        ClientIdRealm().requestAvatar("alice", None, auth.Interface)


# -- authenticate ---------------------------------------------------------------------


def test_authenticate_success(users_file):
    clock = task.Clock()
    clock.advance(1_700_000_000.25)
    authenticator = make_auth(users_file, clock)
    assert authenticator.enabled
    result = result_of(login(authenticator, "alice", "wonderland"))
    assert set(result) == {"authenticated", "client_id", "token", "expires_at"}
    assert result["authenticated"] is True and result["client_id"] == "alice"
    assert len(result["token"]) >= 43  # 32 random bytes, url-safe base64
    assert ISO_MS_Z.match(result["expires_at"])
    assert result["expires_at"] == iso_utc(1_700_000_000.25 + 3600)
    assert authenticator.check_token(result["token"]) == "alice"


def test_colon_username(users_file):
    result = result_of(login(make_auth(users_file), "team:carol", "c"))
    assert result["client_id"] == "team:carol"


def test_wrong_password_and_unknown_user_look_the_same(users_file):
    authenticator = make_auth(users_file)
    wrong = stui_error_of(login(authenticator, "alice", "WONDERLAND"))
    unknown = stui_error_of(login(authenticator, "mallory", "wonderland"))
    malformed = stui_error_of(login(authenticator, "not a name", "x"))
    for error in (wrong, unknown, malformed):
        assert error.error_type == "AuthenticationFailed"
        assert error.message == "invalid username or password"
        assert error.details == {}


def test_unknown_user_runs_a_dummy_hash_of_the_same_cost(users_file, scrypt_calls):
    authenticator = make_auth(users_file)
    stui_error_of(login(authenticator, "alice", "bad"))
    stui_error_of(login(authenticator, "mallory", "bad"))
    stui_error_of(login(authenticator, "not a name", "bad"))
    assert len(scrypt_calls) == 3
    params = [{k: c[k] for k in ("n", "r", "p", "dklen")} for c in scrypt_calls]
    assert params[0] == params[1] == params[2] == {"n": 2**10, "r": 8, "p": 1, "dklen": 32}


def test_non_string_parameters_are_invalid_requests(users_file):
    authenticator = make_auth(users_file)
    for username, password in ((None, "x"), ("alice", 42), (["a"], "x")):
        error = stui_error_of(login(authenticator, username, password))
        assert error.error_type == "InvalidRequest"


def test_auth_disabled(tmp_path):
    authenticator = Authenticator(Settings(), task.Clock())
    assert not authenticator.enabled
    assert authenticator.load() == 0
    error = stui_error_of(login(authenticator, "alice", "x"))
    assert error.error_type == "AuthenticationFailed"
    assert "--auth-file" in error.message
    assert authenticator.check_token("anything") is None
    assert not authenticator.has_user("alice")


def test_file_reload_on_change(users_file):
    authenticator = make_auth(users_file)
    assert result_of(login(authenticator, "alice", "wonderland"))
    write_users(users_file, alice="looking-glass", dave="d")
    stui_error_of(login(authenticator, "alice", "wonderland"))
    assert result_of(login(authenticator, "alice", "looking-glass"))
    assert result_of(login(authenticator, "dave", "d"))
    stui_error_of(login(authenticator, "bob", "builder"))


def test_reload_when_only_mtime_changes(users_file):
    authenticator = make_auth(users_file)
    assert result_of(login(authenticator, "bob", "builder"))
    text = users_file.read_text()
    new_bob = f"bob:{hash_password('other', **FAST)}"
    old_bob = next(line for line in text.splitlines() if line.startswith("bob:"))
    with open(users_file, "w") as f:  # same inode, same size
        f.write(text.replace(old_bob, new_bob))
    st = os.stat(users_file)
    os.utime(users_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert result_of(login(authenticator, "bob", "other"))


def test_missing_file_fails_closed(tmp_path, users_file):
    missing = make_auth(tmp_path / "missing")
    with pytest.raises(PasswordFileError, match="cannot read password file"):
        missing.load()
    assert stui_error_of(login(missing, "alice", "wonderland")).error_type == (
        "AuthenticationFailed"
    )

    authenticator = make_auth(users_file)
    assert authenticator.load() == 3
    users_file.unlink()
    stui_error_of(login(authenticator, "alice", "wonderland"))
    write_users(users_file, alice="wonderland")
    assert result_of(login(authenticator, "alice", "wonderland"))


def test_permission_and_malformed_line_warnings(users_file, monkeypatch):
    events = []
    monkeypatch.setattr(auth, "log", Logger(observer=events.append))
    with open(users_file, "a") as f:
        f.write("broken line\n")
    os.chmod(users_file, 0o644)
    assert make_auth(users_file).load() == 3
    formats = " ".join(e["log_format"] for e in events)
    assert "readable by group or others" in formats
    assert any("line 5" in e.get("problem", "") for e in events)


# -- brute force ----------------------------------------------------------------------


def test_rate_limit_per_peer(users_file, scrypt_calls):
    clock = task.Clock()
    authenticator = make_auth(users_file, clock, auth_failures_per_peer=3)
    for i in range(3):
        stui_error_of(login(authenticator, f"user{i}", "guess", peer="10.0.0.9"))
        clock.advance(10)
    hashes = len(scrypt_calls)
    error = stui_error_of(login(authenticator, "alice", "wonderland", peer="10.0.0.9"))
    assert error.error_type == "RateLimited"
    assert error.details == {"retry_after": 30}  # first failure at t=0, now t=30
    assert len(scrypt_calls) == hashes  # the password was not even checked
    # other peers are unaffected
    assert result_of(login(authenticator, "alice", "wonderland", peer="10.0.0.10"))
    # when the oldest failure leaves the window, one attempt is allowed again
    clock.advance(30)
    assert result_of(login(authenticator, "alice", "wonderland", peer="10.0.0.9"))
    stui_error_of(login(authenticator, "x", "y", peer="10.0.0.9"))
    assert stui_error_of(login(authenticator, "alice", "wonderland", peer="10.0.0.9")).details == {
        "retry_after": 10
    }


def test_rate_limit_per_user(users_file):
    clock = task.Clock()
    authenticator = make_auth(users_file, clock, auth_failures_per_user=3)
    for i in range(3):
        stui_error_of(login(authenticator, "alice", f"guess{i}", peer=f"10.0.1.{i}"))
    error = stui_error_of(login(authenticator, "alice", "wonderland", peer="192.0.2.7"))
    assert error.error_type == "RateLimited"
    assert error.details["retry_after"] == 60
    assert "retry in 60 s" in error.message
    assert result_of(login(authenticator, "bob", "builder", peer="192.0.2.7"))
    clock.advance(60)
    assert result_of(login(authenticator, "alice", "wonderland", peer="192.0.2.7"))


def test_unknown_users_are_limited_like_known_ones(users_file):
    authenticator = make_auth(users_file, auth_failures_per_user=2)
    for peer in ("a", "b"):
        stui_error_of(login(authenticator, "mallory", "x", peer=peer))
    assert stui_error_of(login(authenticator, "mallory", "x", peer="c")).error_type == (
        "RateLimited"
    )


def test_rate_limited_attempts_do_not_extend_the_lockout(users_file):
    clock = task.Clock()
    authenticator = make_auth(users_file, clock, auth_failures_per_peer=2)
    for name in ("mallory", "trudy"):
        stui_error_of(login(authenticator, name, "bad"))
    for _ in range(50):
        clock.advance(1)
        assert stui_error_of(login(authenticator, "alice", "bad")).error_type == "RateLimited"
    clock.advance(10)
    assert result_of(login(authenticator, "alice", "wonderland"))


def test_concurrent_attempts_count_against_the_limit(users_file):
    pool = ManualPool()
    authenticator = make_auth(users_file, pool=pool, auth_failures_per_user=3)
    pending = [login(authenticator, "alice", f"guess{i}", peer=f"p{i}") for i in range(3)]
    flood = stui_error_of(login(authenticator, "alice", "guess", peer="p9"))
    assert flood.error_type == "RateLimited" and flood.details == {"retry_after": 1}
    assert len(pool.queue) == 3
    pool.run_all()
    for d in pending:
        assert stui_error_of(d).error_type == "AuthenticationFailed"


def test_concurrent_attempts_on_many_names_count_against_the_address(users_file):
    pool = ManualPool()
    authenticator = make_auth(users_file, pool=pool, auth_failures_per_peer=3)
    pending = [login(authenticator, name, "guess") for name in ("u1", "u2", "alice")]
    flood = stui_error_of(login(authenticator, "u4", "guess"))
    assert flood.error_type == "RateLimited" and flood.details == {"retry_after": 1}
    # A name already in flight adds no name: the per-username limit bounds it.
    pending.append(login(authenticator, "alice", "guess again"))
    assert len(pool.queue) == 4
    pool.run_all()
    for d in pending:
        assert stui_error_of(d).error_type == "AuthenticationFailed"


def test_wrong_passwords_for_one_user_do_not_lock_out_others_on_the_same_address(users_file):
    """Issue 12.9: a few wrong passwords for bob from 127.0.0.1 locked out alice too."""
    clock = task.Clock()
    authenticator = make_auth(
        users_file, clock, auth_failures_per_peer=10, auth_failures_per_user=10
    )
    answers = []
    for i in range(12):
        answers.append(stui_error_of(login(authenticator, "bob", f"wrong{i}", peer="127.0.0.1")))
        clock.advance(1)
    assert [a.error_type for a in answers] == ["AuthenticationFailed"] * 10 + ["RateLimited"] * 2
    granted = result_of(login(authenticator, "alice", "wonderland", peer="127.0.0.1"))
    assert granted["client_id"] == "alice"
    # The per-username limit still holds bob, whatever the address.
    for peer in ("127.0.0.1", "10.0.0.5"):
        assert stui_error_of(login(authenticator, "bob", "builder", peer=peer)).error_type == (
            "RateLimited"
        )


def test_failures_for_many_unknown_usernames_lock_the_address(users_file):
    clock = task.Clock()
    authenticator = make_auth(
        users_file, clock, auth_failures_per_peer=10, auth_failures_per_user=10
    )
    for i in range(10):
        stui_error_of(login(authenticator, f"nobody{i}", "guess", peer="127.0.0.1"))
        clock.advance(1)
    locked = stui_error_of(login(authenticator, "alice", "wonderland", peer="127.0.0.1"))
    assert locked.error_type == "RateLimited" and locked.details == {"retry_after": 50}
    assert result_of(login(authenticator, "alice", "wonderland", peer="10.0.0.5"))
    # Malformed names count one each, however often the same one is sent.
    for _ in range(10):
        stui_error_of(login(authenticator, "  not a name", "guess", peer="10.0.0.6"))
    assert stui_error_of(
        login(authenticator, "alice", "wonderland", peer="10.0.0.6")
    ).error_type == ("RateLimited")
    clock.advance(50)
    assert result_of(login(authenticator, "alice", "wonderland", peer="127.0.0.1"))


def test_the_address_limit_does_not_tell_which_users_exist(users_file):
    """The same attempts with a real and a made-up name get the same answers."""

    def answers(name: str) -> list[str]:
        authenticator = make_auth(users_file, auth_failures_per_peer=3, auth_failures_per_user=5)
        attempts = ["x1", "x2", name, name, name, "x3", name, name, name]
        return [stui_error_of(login(authenticator, n, "guess")).error_type for n in attempts]

    assert answers("bob") == answers("nobody")
    assert answers("bob")[-4:] == ["RateLimited"] * 4


def test_global_cap_on_queued_checks(users_file):
    pool = ManualPool()
    authenticator = make_auth(users_file, pool=pool)
    authenticator.max_pending_checks = 4
    pending = [login(authenticator, "alice", "x", peer=f"p{i}") for i in range(4)]
    assert stui_error_of(login(authenticator, "bob", "builder", peer="q")).error_type == (
        "RateLimited"
    )
    pool.run_all()
    for d in pending:
        stui_error_of(d)
    d = login(authenticator, "bob", "builder", peer="q")
    pool.run_all()
    assert result_of(d)["client_id"] == "bob"


# -- tokens ---------------------------------------------------------------------------


def test_token_expiry(users_file):
    clock = task.Clock()
    authenticator = make_auth(users_file, clock, token_ttl=100.0)
    token = result_of(login(authenticator, "alice", "wonderland"))["token"]
    clock.advance(99.9)
    assert authenticator.check_token(token) == "alice"
    clock.advance(0.1)
    assert authenticator.check_token(token) is None
    assert authenticator.token_count() == 0


def test_check_token_rejects_junk(users_file):
    authenticator = make_auth(users_file)
    result_of(login(authenticator, "alice", "wonderland"))
    for junk in (None, "", "x" * 10_000, 42, b"token", "not-a-token"):
        assert authenticator.check_token(junk) is None


def test_revoke(users_file):
    authenticator = make_auth(users_file)
    one = result_of(login(authenticator, "alice", "wonderland"))["token"]
    two = result_of(login(authenticator, "alice", "wonderland"))["token"]
    assert one != two
    assert authenticator.revoke(one) is True
    assert authenticator.revoke(one) is False
    assert authenticator.check_token(one) is None
    assert authenticator.check_token(two) == "alice"
    assert authenticator.revoke_client("alice") == 1
    assert authenticator.check_token(two) is None


def test_tokens_per_user_are_bounded(users_file):
    authenticator = make_auth(users_file)
    authenticator.max_tokens_per_user = 3
    tokens = [result_of(login(authenticator, "alice", "wonderland"))["token"] for _ in range(5)]
    bob = result_of(login(authenticator, "bob", "builder"))["token"]
    assert [authenticator.check_token(t) for t in tokens] == [None, None, "alice", "alice", "alice"]
    assert authenticator.check_token(bob) == "bob"
    assert authenticator.token_count() == 4


def test_deleting_a_user_invalidates_their_tokens(users_file):
    clock = task.Clock()
    authenticator = make_auth(users_file, clock)
    alice = result_of(login(authenticator, "alice", "wonderland"))["token"]
    bob = result_of(login(authenticator, "bob", "builder"))["token"]
    write_users(users_file, bob="builder")
    clock.advance(auth.FILE_STAT_INTERVAL)
    assert authenticator.check_token(bob) == "bob"  # notices the change, re-reads the file
    assert authenticator.check_token(alice) is None
    assert not authenticator.has_user("alice")


def test_prune(users_file):
    clock = task.Clock()
    authenticator = make_auth(users_file, clock, token_ttl=10.0)
    result_of(login(authenticator, "alice", "wonderland"))
    stui_error_of(login(authenticator, "alice", "bad"))
    clock.advance(100)
    authenticator.prune()
    assert authenticator.token_count() == 0
    assert len(authenticator._peer_failures) == 0 and len(authenticator._user_failures) == 0


# -- real threads ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hashing_runs_off_the_reactor_thread(users_file, scrypt_calls):
    from twisted.internet import reactor

    write_users(users_file, alice="wonderland")
    scrypt_calls.clear()
    authenticator = Authenticator(Settings(auth_file=str(users_file)), reactor)
    assert authenticator.load() == 1
    authenticator.startService()
    try:
        result = await authenticator.authenticate("alice", "wonderland", "127.0.0.1")
        with pytest.raises(StuiError):
            await authenticator.authenticate("nobody", "wonderland", "127.0.0.1")
    finally:
        await defer.maybeDeferred(authenticator.stopService)
    assert result["client_id"] == "alice"
    assert authenticator.check_token(result["token"]) == "alice"
    main = threading.get_ident()
    assert scrypt_calls and all(c["thread"] != main for c in scrypt_calls)
