"""Start-up and the command line, tested on real ``twistd`` processes.

A listener that cannot bind stops start-up at once with one log line naming
the option and the address; the CLI's own options (``--help``,
``--version``, ``--check-config``) say what they should.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.serverproc import REPO_ROOT, ServerProcess, make_self_signed, twistd_command

pytestmark = pytest.mark.e2e


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


def run_twistd(workdir: Path, twistd_args: list[str], stui_args: list[str], timeout: float = 60.0):
    """Run C{twistd TWISTD_ARGS stui STUI_ARGS} to its end; (status, seconds, output)."""
    started = time.monotonic()
    completed = subprocess.run(
        [*twistd_command(), *twistd_args, "stui", *stui_args],
        cwd=workdir,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return completed.returncode, time.monotonic() - started, completed.stdout + completed.stderr


@pytest.fixture
def busy_port():
    """A loopback TCP port that is bound and listening (so nobody else can)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def _listener_args(kind: str, port: int, tmp_path: Path) -> tuple[str, list[str]]:
    """(option, the stui arguments) with the C{kind} listener on C{port}."""
    free = ["--tcp=tcp:0:interface=127.0.0.1", "--zmq=tcp://127.0.0.1:*"]
    if kind == "tcp":
        return "--tcp", [f"--tcp=tcp:{port}:interface=127.0.0.1", "--zmq=tcp://127.0.0.1:*"]
    if kind == "zmq":
        return "--zmq", ["--tcp=tcp:0:interface=127.0.0.1", f"--zmq=tcp://127.0.0.1:{port}"]
    if kind == "metrics":
        return "--metrics", [*free, f"--metrics=tcp:{port}:interface=127.0.0.1"]
    key, cert = make_self_signed(tmp_path)
    return "--tls", [*free, f"--tls=ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"]


@pytest.mark.parametrize("kind", ["tcp", "tls", "zmq", "metrics"])
def test_a_port_in_use_stops_start_up_at_once_with_one_clear_line(tmp_path, busy_port, kind):
    option, args = _listener_args(kind, busy_port, tmp_path)
    log = tmp_path / "twistd.log"
    status, seconds, output = run_twistd(
        tmp_path,
        ["-n", f"--logfile={log}", "--pidfile="],
        [*args, f"--data-dir={tmp_path / 'data'}", "--image=yes"],
        timeout=30,
    )
    text = log.read_text()
    assert status != 0, text
    assert seconds < 5, f"took {seconds:.1f} s to give up:\n{text}"
    failures = [line for line in text.splitlines() if "start-up failed" in line]
    assert len(failures) == 1, text
    assert f"{option}=" in failures[0] and f"127.0.0.1:{busy_port}" in failures[0], failures
    assert "Address already in use" in failures[0]
    assert "Traceback" not in text + output
    assert "image started" not in text  # nothing was spawned: binds come first
    assert not (tmp_path / "data").exists()  # nor was the store opened


@pytest.mark.parametrize("problem", ["not-a-directory", "short-secret-key"])
def test_an_unusable_data_dir_stops_start_up_at_once(tmp_path, problem):
    """operations.md: a damaged secret.key means "refusing to start" -- and so it does."""
    data = tmp_path / "data"
    if problem == "not-a-directory":
        data.write_text("")
        data = data / "data"
        words = "could not prepare data directory"
    else:
        data.mkdir(mode=0o700)
        (data / "secret.key").write_bytes(b"short")
        words = "holds 5 bytes, expected 32; refusing to start"
    log = tmp_path / "twistd.log"
    status, seconds, output = run_twistd(
        tmp_path,
        ["-n", f"--logfile={log}", "--pidfile="],
        ["--tcp=tcp:0:interface=127.0.0.1", "--zmq=tcp://127.0.0.1:*", f"--data-dir={data}"],
        timeout=30,
    )
    text = log.read_text()
    assert status == 1, text
    assert seconds < 5, text
    failures = [line for line in text.splitlines() if "start-up failed" in line]
    assert len(failures) == 1 and f"--data-dir={data}" in failures[0] and words in failures[0]
    assert "Traceback" not in text + output
    assert "image started" not in text


def test_a_daemon_with_a_port_in_use_reports_it_to_its_parent(tmp_path, busy_port):
    """Without -n the waiting parent exits 1 naming the option; no pidfile is left."""
    pidfile = tmp_path / "stui.pid"
    log = tmp_path / "twistd.log"
    status, seconds, output = run_twistd(
        tmp_path,
        [f"--pidfile={pidfile}", f"--logfile={log}"],
        [
            "--tcp=tcp:0:interface=127.0.0.1",
            f"--zmq=tcp://127.0.0.1:{busy_port}",
            f"--data-dir={tmp_path / 'data'}",
            "--image=no",
        ],
        timeout=30,
    )
    assert status == 1, output
    assert seconds < 5, output
    assert f"--zmq tcp://127.0.0.1:{busy_port}: Address already in use" in output
    assert not pidfile.exists()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "start-up failed" not in log.read_text():
        time.sleep(0.05)
    assert "Traceback" not in log.read_text()


# -- the command line ------------------------------------------------------------------


def test_help_prints_one_usage_line_and_defaults_as_they_are_written(tmp_path):
    status, _seconds, output = run_twistd(tmp_path, [], ["--help"])
    assert status == 0, output
    usage_lines = [line for line in output.splitlines() if line.startswith("Usage:")]
    assert usage_lines == ["Usage: twistd [options] stui [options]"], usage_lines
    flat = " ".join(output.split())  # undo the help text's line wrapping
    assert "run the live image (yes/no) [default: yes]" in flat
    assert "[default: True]" not in flat and "[default: None]" not in flat
    assert "[default: ()]" not in flat
    assert "--check-config" in flat and "--max-sessions-total" in flat


def test_version_says_the_stui_version_too(tmp_path):
    from stui_twisted import PROTOCOL_VERSION, __version__
    from twisted import copyright

    status, _seconds, output = run_twistd(tmp_path, [], ["--version"])
    assert status == 0, output
    assert f"stui-twisted {__version__} (protocol {PROTOCOL_VERSION})" in output
    assert f"Twisted version: {copyright.version}" in output


@pytest.mark.parametrize(
    "ini, words",
    [
        ("durabilty = always\n", "unknown option 'durabilty'"),
        ("flush_interval = 0\n", "flush_interval = 0: --flush-interval must be greater than 0"),
        ("tcp = tcp:7555\n", "without authentication"),
        ("auth_file = missing-users\n", "--auth-file"),
        ("tls = ssl:0:interface=127.0.0.1:privateKey=nokey.pem:certKey=nocert.pem\n", "nocert.pem"),
    ],
)
def test_check_config_names_the_bad_key_and_exits_non_zero(tmp_path, ini, words):
    config = tmp_path / "stui.ini"
    config.write_text("[stui]\n" + ini)
    status, seconds, output = run_twistd(tmp_path, [], [f"--config={config}", "--check-config"])
    assert status == 1, output
    assert "configuration error" in output and words in output, output
    assert "Traceback" not in output and "Usage:" not in output
    assert not (tmp_path / "stui-data").exists() and not (tmp_path / "twistd.pid").exists()


def test_check_config_accepts_the_example_and_the_security_settings(tmp_path):
    example = REPO_ROOT / "etc" / "stui.ini"
    status, _seconds, output = run_twistd(tmp_path, [], [f"--config={example}", "--check-config"])
    assert status == 0, output
    assert "configuration OK" in output
    config = tmp_path / "stui.ini"
    config.write_text(
        "[stui]\ntoken_ttl = 600\nauth_failures_per_peer = 3\nauth_failures_per_user = 4\n"
        "auth_failure_window = 60\nmax_sessions_total = 50\n"
    )
    status, _seconds, output = run_twistd(tmp_path, [], [f"--config={config}", "--check-config"])
    assert status == 0, output
    from stui_twisted.tap import Options

    options = Options()
    options.parseOptions([f"--config={config}"])
    settings = options.settings
    assert (settings.token_ttl, settings.auth_failure_window) == (600.0, 60.0)
    assert (settings.auth_failures_per_peer, settings.auth_failures_per_user) == (3, 4)


def test_an_unreadable_tls_key_is_one_line_not_a_traceback(tmp_path):
    status, _seconds, output = run_twistd(
        tmp_path,
        ["-n", "--pidfile="],
        [
            "--tls=ssl:0:interface=127.0.0.1:privateKey=nokey.pem:certKey=nocert.pem",
            "--tcp=tcp:0:interface=127.0.0.1",
            "--zmq=none",
            "--image=no",
        ],
    )
    assert status == 1, output
    assert "--tls: cannot read" in output and "nocert.pem" in output
    assert "Traceback" not in output


def _wait_for_log(path: Path, words: str, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and words in path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{words!r} not in {path} within {seconds} s")


@pytest.mark.parametrize(
    "twistd_args, mode",
    [(["--umask=0077"], 0o600), ([], 0o600), (["-n", "--umask=0027"], 0o640)],
    ids=["daemon-umask-0077", "daemon-default", "foreground-umask-0027"],
)
def test_the_log_file_honours_the_umask(tmp_path, twistd_args, mode):
    import signal

    log = tmp_path / "twistd.log"
    pidfile = tmp_path / "twistd.pid"
    command = [
        *twistd_command(),
        *twistd_args,
        f"--pidfile={pidfile}",
        f"--logfile={log}",
        "stui",
        "--tcp=tcp:0:interface=127.0.0.1",
        "--zmq=none",
        "--image=no",
        f"--data-dir={tmp_path / 'data'}",
    ]
    old_umask = os.umask(0o022)  # what a login shell typically has
    try:
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    finally:
        os.umask(old_umask)
    try:
        _wait_for_log(log, "session service ready")
        assert log.stat().st_mode & 0o777 == mode, oct(log.stat().st_mode)
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
        proc.wait(30)
        deadline = time.monotonic() + 30
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def test_sigint_is_a_clean_shutdown_with_status_zero(tmp_path):
    """operations.md: SIGTERM or SIGINT (Ctrl-C) flushes everything and exits 0."""
    import signal

    proc = ServerProcess(tmp_path, image=False, zmq=False).start()
    client = proc.tcp_client()
    client.result("create_session", client_id="ctrl-c")
    proc.process.send_signal(signal.SIGINT)
    assert proc.process.wait(30) == 0, proc.log_text()
    assert "SIGINT: shutting down" in proc.log_text()
    assert "every dirty session was flushed" in proc.log_text()
    client.close()


# -- what the README and docs tell a new user to type ----------------------------------

README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.S)


def test_readme_starts_with_the_two_set_up_commands_and_says_where_to_type_next():
    blocks = _code_blocks(README.read_text())
    assert blocks[0].strip() == (
        "python3.11 -m venv .venv && .venv/bin/pip install . && .venv/bin/twistd -n stui"
    )
    assert blocks[1].strip() == (
        "python3.11 -m venv .venv && .venv/bin/pip install '.[test]' && .venv/bin/python -m pytest"
    )
    between = README.read_text().split(blocks[0], 1)[1].split(blocks[1], 1)[0]
    assert "keeps this terminal" in between and "another terminal" in between


def test_no_doc_recommends_an_editable_install_that_hides_the_plugin():
    for path in [README, *DOCS]:
        commands = [*_code_blocks(path.read_text()), *re.findall(r"`([^`\n]+)`", path.read_text())]
        for line in "\n".join(commands).splitlines():
            if re.search(r"pip install -e \S", line):
                assert "editable_mode=compat" in line, f"{path.name}: {line}"


def test_every_markdown_file_the_docs_cite_exists():
    for path in [README, *DOCS]:
        for name in set(re.findall(r"\b([a-z_]+\.md)\b", path.read_text())):
            assert (REPO_ROOT / name).exists() or (REPO_ROOT / "docs" / name).exists(), (
                f"{path.name} cites {name}, which does not exist"
            )


def test_the_daemon_recipe_creates_the_directories_it_uses():
    text = (REPO_ROOT / "docs" / "operations.md").read_text()
    recipe = next(block for block in _code_blocks(text) if "--pidfile=/run/stui" in block)
    creates = next(line for line in recipe.splitlines() if line.startswith("install -d"))
    assert "/run/stui" in creates and "/var/log/stui" in creates


def test_every_doc_and_the_unit_agree_on_the_data_dir():
    unit = (REPO_ROOT / "etc" / "systemd" / "stui.service").read_text()
    (data_dir,) = set(re.findall(r"--data-dir=(\S+)", unit))
    for path in [README, *DOCS]:
        for found in re.findall(r"--data-dir[= ](/var/lib/stui[\w/.-]*)", path.read_text()):
            assert found == data_dir, f"{path.name} says --data-dir={found}, the unit {data_dir}"


def test_the_units_documentation_is_installed_where_it_points():
    import configparser

    unit = (REPO_ROOT / "etc" / "systemd" / "stui.service").read_text()
    documentation = re.search(r"^Documentation=(.*)$", unit, re.M).group(1).split()
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    installed = {
        f"/opt/stui/venv/{target}/{Path(source).name}"
        for target, sources in setup["options.data_files"].items()
        for source in sources.split()
        if (REPO_ROOT / source).exists()
    }
    for url in documentation:
        assert url.startswith("file://"), url
        assert url[len("file://") :] in installed, f"{url} is not installed by setup.cfg"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_the_readme_tls_recipe_verifies_and_exits_with_the_pong(tmp_path):
    """The README's s_client line, as written (but the port), ends by itself."""
    text = README.read_text()
    server_line = next(line for line in text.splitlines() if "twistd -n stui --tls=" in line)
    client_block = next(block for block in _code_blocks(text) if "s_client" in block)
    client = client_block.replace("\\\n", " ").strip()
    assert "-CAfile cert.pem" in client
    proc = ServerProcess(tmp_path, tls=True, image=False, zmq=False)
    tls_option = server_line.split("stui ", 1)[1].strip()
    assert tls_option.startswith(
        "--tls=ssl:7556:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem"
    )
    proc.start()
    try:
        shell = client.replace("7556", str(proc.tls_port))
        started = time.monotonic()
        completed = subprocess.run(
            ["sh", "-c", shell], cwd=tmp_path, capture_output=True, text=True, timeout=30
        )
        assert time.monotonic() - started < 10
        assert completed.returncode == 0, completed.stderr
        reply = json.loads(completed.stdout.strip().splitlines()[0])
        assert reply["result"]["message"] == "pong"
        assert "verify error" not in completed.stderr
    finally:
        proc.kill()
