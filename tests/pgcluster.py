"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl in a temp dir.

It listens on a Unix socket only (C{listen_addresses=''}), in its own directory.
initdb refuses to run as root, so when the tests run as root the cluster runs as
the C{postgres} OS user, who is given the directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time

START_TIMEOUT = 60.0


def find_bin(name: str) -> str | None:
    """C{name} from the newest /usr/lib/postgresql/*/bin, else from PATH."""
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    return shutil.which(name)


def unavailable_reason() -> str | None:
    """Why no cluster can be started here, or None."""
    for name in ("initdb", "pg_ctl"):
        if find_bin(name) is None:
            return f"PostgreSQL's {name} is not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres OS user for initdb"
    return None


class PgCluster:
    """One cluster; L{start} it, connect with L{dsn}, L{stop} it."""

    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="stui-pg-")
        os.chmod(self.base, 0o755)
        self.data = os.path.join(self.base, "data")
        self.socket_dir = os.path.join(self.base, "socket")
        os.mkdir(self.socket_dir)
        self.log_path = os.path.join(self.base, "server.log")
        self._user = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            self._user = entry
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
            os.chown(self.socket_dir, entry.pw_uid, entry.pw_gid)
        self.superuser = "stui_test"

    def _run(self, *command: str, timeout: float = START_TIMEOUT) -> None:
        options: dict = {}
        if self._user is not None:
            options = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        completed = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
            **options,
        )
        if completed.returncode != 0:
            log = ""
            if os.path.exists(self.log_path):
                with open(self.log_path) as handle:
                    log = handle.read()[-4000:]
            raise RuntimeError(
                f"{' '.join(command)} failed ({completed.returncode}):"
                f" {completed.stdout}{completed.stderr}\n{log}"
            )

    def start(self) -> None:
        self._run(
            find_bin("initdb"),
            "-D",
            self.data,
            "-U",
            self.superuser,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        options = f"-c listen_addresses='' -k {self.socket_dir} -c fsync=on"
        self._run(
            find_bin("pg_ctl"), "-D", self.data, "-l", self.log_path, "-o", options, "-w", "start"
        )
        deadline = time.monotonic() + START_TIMEOUT
        socket_file = os.path.join(self.socket_dir, ".s.PGSQL.5432")
        while not os.path.exists(socket_file):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not create {socket_file}")
            time.sleep(0.05)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} dbname={dbname} user={self.superuser}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its DSN."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        try:
            self._run(find_bin("pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
