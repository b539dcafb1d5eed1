"""--store, --secret-file, --node-id, --advertise and --lease-interval: parsing, the --data-dir alias, clear errors."""

from __future__ import annotations

import pytest

from stui_twisted.config import ConfigError, build_settings
from stui_twisted.tap import Options


def settings_of(*argv: str):
    options = Options()
    options.parseOptions(list(argv))
    return options.settings


def test_default_is_the_file_store():
    settings = settings_of()
    assert settings.store == "file" and settings.data_dir == "./stui-data"
    assert settings.secret_file is None and settings.node_id is None


def test_store_file_is_an_alias_of_data_dir():
    assert settings_of("--store=file:/srv/stui").data_dir == "/srv/stui"
    assert settings_of("--store=file:/srv/stui", "--data-dir=/srv/stui").store == "file"
    with pytest.raises(Exception, match="name different directories"):
        settings_of("--store=file:/a", "--data-dir=/b")


@pytest.mark.parametrize(
    "value",
    ["postgresql:host=/tmp dbname=stui", "postgres:dbname=stui", "postgresql://u@h/stui"],
)
def test_postgresql_dsn_forms(value):
    settings = settings_of(f"--store={value}", "--secret-file=/etc/stui/k", "--node-id=a")
    assert settings.store.startswith("postgresql:")
    assert settings.secret_file == "/etc/stui/k" and settings.node_id == "a"
    if "://" in value:
        assert settings.store == "postgresql:" + value


def test_bad_store_values_name_the_option_and_hide_the_dsn():
    with pytest.raises(ConfigError, match="--store must be file:DIR or postgresql:DSN"):
        build_settings({}, {"store": "mysql:x"}, False)
    with pytest.raises(ConfigError, match="--store: the PostgreSQL connection string") as caught:
        build_settings({}, {"store": "postgresql:password=sekrit bad'quote"}, False)
    assert "sekrit" not in str(caught.value)
    with pytest.raises(ConfigError, match="--secret-file applies to --store=postgresql"):
        build_settings({}, {"secret-file": "/k"}, False)


def test_postgresql_store_is_built_in_place_of_the_file_store():
    from twisted.internet import reactor

    from stui_twisted.storage.postgres import PostgresSessionStore
    from stui_twisted.tap import build_server

    settings = settings_of(
        "--store=postgresql:host=/nonexistent dbname=stui",
        "--secret-file=/x/k",
        "--image=no",
        "--node-id=a",
        "--advertise=a.example:7555",
        "--lease-interval=0.5",
    )
    _root, sessions = build_server(settings, reactor)
    assert isinstance(sessions.store, PostgresSessionStore)
    assert sessions.store.secret_file == "/x/k"
    leases = sessions.store.leases
    assert (leases.node_id, leases.advertise, leases.interval, leases.ttl) == (
        "a",
        "a.example:7555",
        0.5,
        1.5,
    )
    assert sessions.node() == {"node_id": "a", "advertise": "a.example:7555"}
    assert sessions.store.where == "postgresql:dbname=stui host=/nonexistent"


def test_advertise_and_lease_interval():
    import socket

    from stui_twisted.settings import node_id_of

    default = settings_of()
    assert default.advertise is None and default.lease_interval == 5.0
    assert node_id_of(default) == socket.gethostname()
    assert settings_of("--advertise=stui-a.example.net:7555").advertise == "stui-a.example.net:7555"
    assert settings_of("--advertise=[::1]:7555").advertise == "[::1]:7555"
    assert settings_of("--advertise=none").advertise is None
    for bad, message in (
        ("stui-a", "must be HOST:PORT"),
        (":7555", "must be HOST:PORT"),
        ("::1:7555", "must be HOST:PORT"),
        ("host:0", "the port must be 1-65535"),
        ("host:http", "the port must be 1-65535"),
        ("[nope]:7555", "is not an IPv6 address"),
    ):
        with pytest.raises(ConfigError, match=f"--advertise.*{message}"):
            build_settings({}, {"advertise": bad}, False)
    with pytest.raises(ConfigError, match="--lease-interval must be greater than 0"):
        build_settings({}, {"lease-interval": "0"}, False)
    assert build_settings({"lease-interval": "0.5"}, {}, False).lease_interval == 0.5
