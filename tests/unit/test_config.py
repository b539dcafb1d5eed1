"""Options and configuration: defaults, INI file, precedence, refusals."""

from __future__ import annotations

import pytest
from twisted.python import usage

from stui_twisted.tap import Options


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_embedded_defaults_are_loopback_and_local_files():
    settings = parse().settings
    assert settings.tcp == "tcp:7555:interface=127.0.0.1"
    assert settings.tls == "none"
    assert settings.zmq == "tcp://127.0.0.1:5555"
    assert settings.data_dir == "./stui-data"
    assert settings.durability == "batch"
    assert settings.flush_interval == 0.1
    assert settings.max_sessions_per_client == 5


def test_flags_override_config_file(tmp_path):
    ini = tmp_path / "stui.ini"
    ini.write_text(
        "[stui]\ndurability = always\nsession_timeout = 120\nmax-sessions-per-client = 2\n"
        "deny_clients = evil*, bad\n"
    )
    settings = parse(f"--config={ini}", "--max-sessions-per-client=9").settings
    assert settings.durability == "always"
    assert settings.default_timeout == 120.0
    assert settings.max_sessions_per_client == 9
    assert settings.deny_clients == ("evil*", "bad")


def test_shipped_example_config_parses():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "etc" / "stui.ini"
    settings = parse(f"--config={example}").settings
    assert settings.tcp.startswith("tcp:")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--durability=sometimes"], "--durability must be one of always, batch, none"),
        (["--flush-interval=0"], "--flush-interval must be greater than 0"),
        (["--max-sessions-per-client=x"], "--max-sessions-per-client must be a whole number"),
        (["--zmq=udp://1.2.3.4:5"], "--zmq"),
        (["--tcp=tcp:7555"], "without authentication"),
        (["--tcp=tcp:7555:interface=0.0.0.0"], "--auth-file"),
        (["--zmq=tcp://*:5555"], "without authentication"),
        (["--metrics=tcp:9100"], "--metrics must listen on loopback"),
    ],
)
def test_bad_values_are_usage_errors_naming_the_option(argv, words):
    with pytest.raises(usage.UsageError) as caught:
        parse(*argv)
    assert words in str(caught.value)


def test_unknown_config_key_is_refused(tmp_path):
    ini = tmp_path / "stui.ini"
    ini.write_text("[stui]\ndurabilty = always\n")
    with pytest.raises(usage.UsageError, match="unknown option 'durabilty'"):
        parse(f"--config={ini}")


def test_non_loopback_allowed_with_auth_file_or_insecure_flag(tmp_path):
    assert parse("--tcp=tcp:7555:interface=0.0.0.0", "--insecure-no-auth").settings.insecure_no_auth
    auth = tmp_path / "users"
    auth.write_text("")
    settings = parse("--tcp=tcp:7555:interface=0.0.0.0", f"--auth-file={auth}").settings
    assert settings.auth_file == str(auth)


def test_make_service_only_assembles(tmp_path):
    """makeService builds the tree without listening, spawning or touching disk."""
    from stui_twisted.tap import makeService

    data = tmp_path / "data"
    options = parse(f"--data-dir={data}", "--tls=none")
    root = makeService(options)
    names = {child.name for child in root}
    assert {"sessions", "tcp", "zmq"} <= names
    assert not data.exists()
    assert not root.running
