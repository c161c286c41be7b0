"""An online copy of the SQLite store (``clopos-hydrator backup DEST``).

SQLite's backup API copies a consistent state of the database while the service keeps
writing (WAL mode: readers never block the writer), so a backup needs no downtime. A
plain ``cp`` of a live database can miss what is still in its -wal file.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from app.errors import ConfigError


def backup_sqlite(source: Path, dest: Path) -> int:
    """Copy ``source`` into the new file ``dest``; return the number of pages copied.
    Raises FileExistsError rather than overwrite ``dest``."""
    if not source.is_file():
        raise ConfigError("DATABASE_URL", f"no database at {source}")
    if dest.exists():
        raise FileExistsError(f"{dest} exists: a backup never overwrites a file")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        out = sqlite3.connect(dest)
        try:
            src.backup(out)
            pages = int(out.execute("PRAGMA page_count").fetchone()[0])
            # The copy is a plain file: one piece, whatever the source's journal mode.
            out.execute("PRAGMA journal_mode=DELETE")
        finally:
            out.close()
    finally:
        src.close()
    return pages
