"""The PostgreSQL store's schema and its numbered migrations.

L{migrate} runs at start-up: under a transaction-scoped advisory lock (so two nodes
starting at once do not race), it creates C{schema_version} if missing and applies
every migration newer than the recorded version, all in one transaction.  A
migration is never edited once shipped; a change is a new number.
"""

from __future__ import annotations

#: Any constant key: the advisory lock that serializes migrations across nodes.
MIGRATION_LOCK_KEY = 0x5354_5549  # "STUI"

#: version -> SQL statements; applied in order, each version once.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # one row per session: the whole sealed envelope (the same bytes as a
        # session file), plus copies of its ids for lookups
        """CREATE TABLE sessions (
            client_id text NOT NULL,
            session_id text NOT NULL,
            document bytea NOT NULL,
            saved_at text NOT NULL,
            size_bytes integer NOT NULL,
            PRIMARY KEY (client_id, session_id)
        )""",
        # what save_context saved (format stui-saved-context)
        """CREATE TABLE saved_copies (
            client_id text NOT NULL,
            session_id text NOT NULL,
            document bytea NOT NULL,
            saved_at text NOT NULL,
            size_bytes integer NOT NULL,
            PRIMARY KEY (client_id, session_id)
        )""",
        # the shared namespace, one row per node id
        """CREATE TABLE shared (
            node_id text PRIMARY KEY,
            document bytea NOT NULL,
            saved_at text NOT NULL
        )""",
        # rows that failed their MAC: moved here, never unpickled, never deleted
        """CREATE TABLE quarantine (
            id bigserial PRIMARY KEY,
            source text NOT NULL,
            client_id text,
            session_id text,
            node_id text,
            document bytea NOT NULL,
            reason text NOT NULL,
            quarantined_at timestamptz NOT NULL DEFAULT now()
        )""",
    ),
    2: (
        # which node serves a session now (docs/operations.md "Two nodes"): a lease
        # runs out at expires_at, on the database's clock, unless its node renews it
        """CREATE TABLE leases (
            session_id text PRIMARY KEY,
            node_id text NOT NULL,
            advertise text,
            expires_at timestamptz NOT NULL
        )""",
        "CREATE INDEX leases_node_id ON leases (node_id)",
    ),
}

LATEST_VERSION = max(MIGRATIONS)


def migrate(connection) -> tuple[int, int]:
    """Bring the schema to L{LATEST_VERSION} in one transaction.

    @param connection: a psycopg connection (not in autocommit mode).
    @return: (version found, version now).
    @raise RuntimeError: the database holds a newer schema than this server knows.
    """
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = connection.execute("SELECT max(version) FROM schema_version").fetchone()
        found = row[0] or 0
        if found > LATEST_VERSION:
            raise RuntimeError(
                f"the database schema is version {found}, newer than this server's"
                f" {LATEST_VERSION}; upgrade the server"
            )
        for version in sorted(v for v in MIGRATIONS if v > found):
            for statement in MIGRATIONS[version]:
                connection.execute(statement)
            connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return found, LATEST_VERSION
