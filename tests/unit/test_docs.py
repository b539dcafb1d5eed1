"""The documentation matches the code: options, commands, error types, etc/ files.

Regenerate the option table of docs/operations.md with
C{python -m tests.unit.test_docs > /tmp/options.md} and paste it between the markers.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from unittest import mock

import pytest
from twisted.internet.task import Clock

from stui_twisted.config import OPTIONS, shown_default
from stui_twisted.dispatch.commands import build_commands
from stui_twisted.dispatch.dispatcher import Dispatcher
from stui_twisted.protocol.errors import ERROR_TYPES
from stui_twisted.settings import Settings
from stui_twisted.tap import Options

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "docs" / "protocol.md"
OPERATIONS = ROOT / "docs" / "operations.md"
INI = ROOT / "etc" / "stui.ini"
UNIT = ROOT / "etc" / "systemd" / "stui.service"
LOGROTATE = ROOT / "etc" / "logrotate.d" / "stui"
BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def options_table() -> str:
    """The option table as docs/operations.md must have it, built from tap.Options."""
    defaults = Settings()
    lines = ["| option | INI key | default | meaning |", "|---|---|---|---|"]
    described = {name: (field, text) for name, (field, _parse, text) in OPTIONS.items()}
    for long_name, _short, _default_value, doc in sorted(Options.optParameters):
        if long_name == "config":
            lines.append(f"| `--config=FILE`, `-c` | — | none | {_cell(doc)} |")
            continue
        field, text = described[long_name]
        key = long_name.replace("-", "_")
        default = shown_default(getattr(defaults, field))
        lines.append(f"| `--{long_name}` | `{key}` | `{default}` | {_cell(text)} |")
    for long_name, _short, doc in Options.optFlags:
        if long_name == "check-config":  # an action, not a setting: no INI key
            lines.append(f"| `--{long_name}` | — | — | {_cell(doc)} |")
            continue
        lines.append(f"| `--{long_name}` | `{long_name.replace('-', '_')}` | `no` | {_cell(doc)} |")
    return "\n".join(lines)


def help_option_names() -> set[str]:
    """The long options C{twistd stui --help} prints."""
    usage = str(Options())
    return set(re.findall(r"--([a-z][a-z-]+)", usage)) - {"help", "version"}


# ------------------------------------------------------------------ operations.md / etc


def test_operations_option_table_matches_the_options():
    text = OPERATIONS.read_text()
    assert BEGIN in text and END in text
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == options_table(), (
        "docs/operations.md's option table is out of date; regenerate it with "
        "`python -m tests.unit.test_docs`"
    )


def test_every_help_option_is_documented():
    text = OPERATIONS.read_text()
    names = help_option_names()
    assert set(OPTIONS) <= names
    missing = [name for name in sorted(names) if f"`--{name}" not in text]
    assert missing == []


def test_every_option_is_in_the_example_ini():
    parser = configparser.ConfigParser(interpolation=None)
    text = INI.read_text()
    parser.read_string(text)
    keys = {key.replace("_", "-") for key in parser["stui"]}
    commented = {m.replace("_", "-") for m in re.findall(r"^;\s*([a-z_]+)\s*=", text, re.MULTILINE)}
    missing = [name for name in OPTIONS if name not in keys | commented]
    assert missing == [], f"etc/stui.ini lacks {missing}"


def test_the_example_ini_is_accepted_by_the_server(tmp_path):
    options = Options()
    options.parseOptions([f"--config={INI}"])
    assert options.settings.tcp == Settings().tcp


def test_systemd_unit_runs_twistd_stui_hardened():
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    service = parser["Service"]
    assert "twistd" in service["ExecStart"] and " stui" in service["ExecStart"]
    assert "--nodaemon" in service["ExecStart"] or " -n " in service["ExecStart"]
    assert service["Type"] == "simple"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/stui" in service["ReadWritePaths"]
    assert service["KillSignal"] == "SIGTERM"
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def test_logrotate_uses_copytruncate():
    text = LOGROTATE.read_text()
    assert "copytruncate" in text
    assert "/var/log/stui/" in text


# ------------------------------------------------------------------ protocol.md


def command_table():
    dispatcher = Dispatcher(clock=Clock())
    return {command.name: command for command in build_commands(mock.Mock(), dispatcher)}


def protocol_sections() -> dict[str, str]:
    text = PROTOCOL.read_text()
    sections = re.split(r"^### `([a-z_]+)`\s*$", text, flags=re.MULTILINE)
    return dict(zip(sections[1::2], sections[2::2], strict=True))


def test_every_command_has_a_section():
    sections = protocol_sections()
    assert sorted(sections) == sorted(command_table())


@pytest.mark.parametrize("name", sorted(command_table()))
def test_every_parameter_is_documented(name):
    section = protocol_sections()[name]
    for param in command_table()[name].params:
        assert f"`{param.name}`" in section, f"{name}: parameter {param.name} undocumented"


def test_every_error_type_is_documented():
    text = PROTOCOL.read_text()
    table = text.split("## 3. Errors", 1)[1].split("## 4.", 1)[0]
    documented = set(re.findall(r"^\| `([A-Za-z]+)` \|", table, re.MULTILINE))
    assert documented == set(ERROR_TYPES)


def test_operations_mentions_every_admin_command():
    from stui_twisted.ops.admin import COMMANDS

    text = OPERATIONS.read_text()
    for name in COMMANDS:
        assert re.search(rf"stui-admin .*\b{name}\b", text), name


if __name__ == "__main__":
    print(BEGIN)
    print(options_table())
    print(END)
