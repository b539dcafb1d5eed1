"""Privilege separation: ``--image-user`` runs user code as another OS user (issue 13.15)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from stui_twisted.config import ConfigError, build_settings
from stui_twisted.image import privileges
from stui_twisted.image.privileges import PrivilegeError, check_can_switch_to
from tests.serverproc import REPO_ROOT, ServerProcess

IMAGE_USER = "nobody"
SYSTEM_PYTHON = "/usr/bin/python3.11"


def test_switching_needs_root_or_the_capabilities(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(privileges, "_effective_capabilities", lambda: 1 << privileges.CAP_SETUID)
    with pytest.raises(PrivilegeError, match="missing: CAP_KILL, CAP_SETGID"):
        check_can_switch_to(IMAGE_USER)
    every = sum(1 << bit for bit in privileges.NEEDED_CAPABILITIES.values())
    monkeypatch.setattr(privileges, "_effective_capabilities", lambda: every)
    assert check_can_switch_to(IMAGE_USER).uid == pwd.getpwnam(IMAGE_USER).pw_uid


def test_unknown_own_and_root_users_are_refused_by_name():
    with pytest.raises(ConfigError, match="--image-user: there is no user 'no-such-user-x'"):
        build_settings({}, {"image-user": "no-such-user-x"}, False)
    with pytest.raises(ConfigError, match="the image must not run as root|server's own user"):
        build_settings({}, {"image-user": "root"}, False)


def test_a_data_dir_the_image_user_owns_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, pwd.getpwnam(IMAGE_USER).pw_uid, -1)
    with pytest.raises(ConfigError, match="belongs to 'nobody'"):
        build_settings({}, {"image-user": IMAGE_USER, "data-dir": str(data)}, False)


def _image_user_can_run_the_image() -> str | None:
    """Why the end-to-end test cannot run here, or None."""
    if os.geteuid() != 0:
        return "starting the image as another user needs root"
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} is missing"
    account = pwd.getpwnam(IMAGE_USER)
    paths = [str(REPO_ROOT)] + [p for p in sys.path if p.endswith("site-packages")]
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import stui_twisted.image.child, twisted, zope.interface"],
        env={"PYTHONPATH": os.pathsep.join(paths), "PATH": "/usr/bin:/bin"},
        cwd="/",
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"{IMAGE_USER} cannot import the server from {paths}: {probe.stderr[-300:]!r}"
    return None


@pytest.mark.e2e
@pytest.mark.image
@pytest.mark.timeout(90)
def test_user_code_cannot_read_the_data_dir_or_signal_the_server(tmp_path):
    reason = _image_user_can_run_the_image()
    if reason:
        pytest.skip(reason)
    # A work dir everyone may traverse, so only the data dir's own mode protects it.
    workdir = Path(tempfile.mkdtemp(prefix="stui-privsep-", dir="/tmp"))
    workdir.chmod(0o755)
    server = ServerProcess(
        workdir, f"--image-user={IMAGE_USER}", f"--image-python={SYSTEM_PYTHON}", zmq=False
    ).start()
    try:
        client = server.tcp_client()
        client.result("create_session", client_id="alice")
        uid = client.result("evaluate", code="import os\nos.getuid()")["result"]
        assert uid == str(pwd.getpwnam(IMAGE_USER).pw_uid)
        key = Path(server.data_dir) / "secret.key"
        assert key.exists()
        for code in (f"open({str(key)!r}).read()", f"os.listdir({str(server.data_dir)!r})"):
            reply = client.call("evaluate", code=code)
            assert reply["error_type"] == "EvaluationError", reply
            assert "PermissionError" in reply["error"], reply
        reply = client.call("evaluate", code="os.kill(os.getppid(), 9)")
        assert "PermissionError" in reply["error"], reply
        assert client.result("ping")["message"] == "pong"
        old_pid = client.result("ping")["image"]["pid"]
        assert client.call("evaluate", code="os._exit(1)")["error_type"] == "ImageRestarted"
        deadline = time.monotonic() + 15
        while client.result("ping")["image"]["pid"] in (None, old_pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.result("evaluate", code="os.getuid()")["result"] == uid
        assert "as user nobody" in server.log_text()
        # The same path is readable to a process of the server's own user.
        assert Path(server.data_dir, "secret.key").read_bytes()
    finally:
        server.kill()
        shutil.rmtree(workdir, ignore_errors=True)
