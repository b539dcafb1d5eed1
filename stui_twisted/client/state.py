"""The client's small persistent state: which session it last used, per server.

Everything lives in one directory, C{$XDG_STATE_HOME/stui-client} (default
C{~/.local/state/stui-client}), created with mode 0700:

C{state.json}
    C{{"version": 1, "sessions": {"<url> <client_id>": {"session_id", "used_at"}}}},
    written atomically with mode 0600.
C{history}
    the REPL's input history (prompt_toolkit C{FileHistory}), mode 0600.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

STATE_FORMAT_VERSION = 1
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
FALLBACK_CLIENT_ID = "stui-client"


def default_state_dir(environ: dict[str, str] | None = None) -> Path:
    """C{$XDG_STATE_HOME/stui-client}, or C{~/.local/state/stui-client}."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "stui-client"


def sanitize_client_id(raw: str | None) -> str:
    """Turn a user name into a valid C{client_id} (protocol section 7).

    Characters outside C{A-Z a-z 0-9 . _ : @ -} are dropped, leading
    non-alphanumerics removed and the result cut to 128 characters; an empty result
    becomes C{stui-client}.
    """
    kept = re.sub(r"[^A-Za-z0-9._:@-]", "", raw or "")
    kept = re.sub(r"^[^A-Za-z0-9]+", "", kept)[:128]
    return kept or FALLBACK_CLIENT_ID


def is_valid_client_id(client_id: str) -> bool:
    return bool(CLIENT_ID_PATTERN.match(client_id))


class ClientState:
    """Reads and writes C{state.json} in the client's state directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "state.json"

    @property
    def history_path(self) -> Path:
        return self.directory / "history"

    @staticmethod
    def key(server_url: str, client_id: str) -> str:
        return f"{server_url} {client_id}"

    def last_session(self, server_url: str, client_id: str) -> str | None:
        """The session this client last used on that server, if any."""
        entry = self._load()["sessions"].get(self.key(server_url, client_id))
        if isinstance(entry, dict) and isinstance(entry.get("session_id"), str):
            return entry["session_id"]
        return None

    def remember_session(self, server_url: str, client_id: str, session_id: str) -> None:
        data = self._load()
        data["sessions"][self.key(server_url, client_id)] = {
            "session_id": session_id,
            "used_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self._write(data)

    def forget_session(self, server_url: str, client_id: str) -> None:
        data = self._load()
        if data["sessions"].pop(self.key(server_url, client_id), None) is not None:
            self._write(data)

    def ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def ensure_history_file(self) -> Path:
        """Create the history file with mode 0600 (FileHistory only appends to it)."""
        self.ensure_directory()
        path = self.history_path
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.close(fd)
        return path

    def _load(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError):
            # A damaged state file only costs the "restore last session" convenience.
            data = {}
        if not isinstance(data, dict) or not isinstance(data.get("sessions"), dict):
            data = {}
        data.setdefault("version", STATE_FORMAT_VERSION)
        data.setdefault("sessions", {})
        return data

    def _write(self, data: dict) -> None:
        self.ensure_directory()
        fd, temporary = tempfile.mkstemp(prefix=".state-", suffix=".json", dir=self.directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2, sort_keys=True)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
