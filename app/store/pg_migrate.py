"""Versioned schema migrations for the PostgreSQL store, safe for replicas starting at once.

Every replica runs :func:`migrate` when its store opens. The whole run holds one
session-level advisory lock, so when several replicas start together one applies the
pending scripts and the others wait, then find nothing left to do. Each script applies
in its own transaction together with its ``schema_migrations`` row: a crash mid-way
leaves the schema at the previous version, never half of one.
"""

from __future__ import annotations

from importlib import resources

import psycopg

# Any constant shared by every replica of this service; "clopos-hydrator" in ASCII, folded.
MIGRATION_LOCK_KEY = 0x636C6F706F73

CREATE_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version TEXT PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
)
"""


def migration_scripts() -> list[tuple[str, str]]:
    """The packaged PostgreSQL migrations as ``(name, sql)``, in the order they apply."""
    folder = resources.files("app.store").joinpath("migrations_pg")
    scripts = [
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(scripts)


async def migrate(conn: psycopg.AsyncConnection[object]) -> list[str]:
    """Apply the scripts not yet recorded; return the names applied by this call.

    ``conn`` must be in autocommit mode: the advisory lock is session-level and each
    script runs in a transaction of its own.
    """
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        await conn.execute(CREATE_SCHEMA_MIGRATIONS)
        cursor = await conn.execute("SELECT version FROM schema_migrations")
        done = {str(row[0]) for row in await cursor.fetchall()}  # type: ignore[index]
        applied: list[str] = []
        for name, script in migration_scripts():
            if name in done:
                continue
            async with conn.transaction():
                # A whole script in one simple-query call: psycopg sends it unparsed.
                await conn.execute(script.encode())
                await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (name,))
            applied.append(name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
