"""Queue control (flush, hold, release, delete, requeue) as plain SQL on one connection.

The same functions serve a running node (run inside its writer's group
commit, reached through the control socket) and a stopped one (run by the
CLI directly on the spool), so both behave identically.  Each returns the
queue IDs it touched; ``ALL`` selects every message.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

ALL = "ALL"
PENDING = "('queued', 'deferred')"


def _select(db: sqlite3.Connection, ids: Sequence[str], where: str = "1") -> list[str]:
    if list(ids) == [ALL]:
        return [r[0] for r in db.execute(f"SELECT id FROM message WHERE {where}")]
    found = []
    for queue_id in ids:
        row = db.execute(f"SELECT id FROM message WHERE id = ? AND {where}",
                         (queue_id.upper(),)).fetchone()
        if row is not None:
            found.append(row[0])
    return found


def flush(db: sqlite3.Connection, ids: Sequence[str] = (ALL,)) -> list[str]:
    """Deferred recipients become due now (Postfix ``postqueue -f``)."""
    chosen = _select(db, ids, "held = 0")
    db.executemany("UPDATE recipient SET next_attempt = 0 WHERE message = ? AND state = "
                   "'deferred'", [(i,) for i in chosen])
    return chosen


def hold(db: sqlite3.Connection, ids: Sequence[str]) -> list[str]:
    chosen = _select(db, ids, "held = 0")
    db.executemany("UPDATE message SET held = 1 WHERE id = ?", [(i,) for i in chosen])
    return chosen


def release(db: sqlite3.Connection, ids: Sequence[str]) -> list[str]:
    chosen = _select(db, ids, "held = 1")
    db.executemany("UPDATE message SET held = 0 WHERE id = ?", [(i,) for i in chosen])
    db.executemany(f"UPDATE recipient SET next_attempt = 0 WHERE message = ? AND state IN "
                   f"{PENDING}", [(i,) for i in chosen])
    return chosen


def requeue(db: sqlite3.Connection, ids: Sequence[str]) -> list[str]:
    """Pending recipients go back to ``queued`` and are due now."""
    chosen = _select(db, ids)
    db.executemany(f"UPDATE recipient SET state = 'queued', next_attempt = 0 WHERE message = ?"
                   f" AND state IN {PENDING}", [(i,) for i in chosen])
    return chosen


def delete(db: sqlite3.Connection, ids: Sequence[str], body_dir: Path) -> list[str]:
    chosen = _select(db, ids)
    files = []
    for queue_id in chosen:
        row = db.execute("SELECT body_file FROM message WHERE id = ?", (queue_id,)).fetchone()
        if row and row[0]:
            files.append(body_dir / row[0])
        db.execute("DELETE FROM message WHERE id = ?", (queue_id,))
    for path in files:  # an orphan body is removed at the next start if this fails
        path.unlink(missing_ok=True)
    return chosen


ACTIONS = {"flush": flush, "hold": hold, "release": release, "requeue": requeue}
