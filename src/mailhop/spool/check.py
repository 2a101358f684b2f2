"""Spool integrity: ``mailhop queue check`` and the quick form run at startup.

What can go wrong even with SQLite's transactions: a body file deleted or
truncated by hand or by a disk error, rows written by an older version,
files left behind.  Each problem is reported with its queue ID; ``repair``
fixes what can be fixed and moves what cannot be delivered to
``corrupt/`` (envelope and whatever bytes are left) instead of deleting it,
as Postfix does with its corrupt queue.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .model import RcptState

VALID_STATES = tuple(s.value for s in RcptState)


@dataclass(frozen=True)
class Problem:
    kind: str
    queue_id: str
    detail: str


def find_problems(db: sqlite3.Connection, directory: Path, quick: bool = False) -> list[Problem]:
    problems: list[Problem] = []
    if not quick:
        result = db.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            problems.append(Problem("database", "-", f"SQLite quick_check: {result}"))
    bodies = directory / "bodies"
    referenced = set()
    for qid, size, inline, body_file in db.execute(
            "SELECT id, size, length(body), body_file FROM message"):
        if body_file:
            referenced.add(body_file)
            path = bodies / body_file
            if not path.exists():
                problems.append(Problem("missing body", qid, f"{path} does not exist"))
            elif path.stat().st_size != size:
                problems.append(Problem("body size mismatch", qid,
                                        f"{path.stat().st_size} bytes, expected {size}"))
        elif inline is None:
            problems.append(Problem("missing body", qid, "no body stored"))
        elif inline != size:
            problems.append(Problem("body size mismatch", qid, f"{inline} bytes, expected "
                                    f"{size}"))
    for (qid,) in db.execute("SELECT id FROM message m WHERE NOT EXISTS "
                             "(SELECT 1 FROM recipient r WHERE r.message = m.id)"):
        problems.append(Problem("no recipients", qid, "message has no recipients"))
    for (qid,) in db.execute("SELECT DISTINCT message FROM recipient WHERE message NOT IN "
                             "(SELECT id FROM message)"):
        problems.append(Problem("orphan recipients", qid, "recipients of a missing message"))
    marks = ",".join("?" * len(VALID_STATES))
    for qid, state in db.execute(f"SELECT message, state FROM recipient WHERE state NOT IN "
                                 f"({marks})", VALID_STATES):
        problems.append(Problem("bad state", qid, f"recipient state {state!r}"))
    if bodies.exists():
        for path in bodies.iterdir():
            if path.name not in referenced:
                problems.append(Problem("orphan body", path.name, f"{path} belongs to no "
                                        "message"))
    return problems


def repair(db: sqlite3.Connection, directory: Path, problems: list[Problem]) -> list[str]:
    """Fix ``problems`` inside the caller's transaction; returns what was done."""
    done = []
    corrupt = directory / "corrupt"
    for p in problems:
        if p.kind in ("missing body", "body size mismatch", "no recipients"):
            corrupt.mkdir(exist_ok=True, mode=0o700)
            row = db.execute("SELECT sender, sender_params, arrival, body, body_file FROM "
                             "message WHERE id = ?", (p.queue_id,)).fetchone()
            rcpts = [r[0] for r in db.execute("SELECT address FROM recipient WHERE message = ?",
                                              (p.queue_id,))]
            if row is not None:
                (corrupt / f"{p.queue_id}.json").write_text(json.dumps({
                    "queue_id": p.queue_id, "sender": row[0], "params": row[1],
                    "arrival": row[2], "recipients": rcpts, "problem": p.detail}))
                body = row[3] if row[3] is not None else None
                if body is None and row[4] and (directory / "bodies" / row[4]).exists():
                    (directory / "bodies" / row[4]).replace(corrupt / f"{p.queue_id}.eml")
                elif body is not None:
                    (corrupt / f"{p.queue_id}.eml").write_bytes(bytes(body))
            db.execute("DELETE FROM recipient WHERE message = ?", (p.queue_id,))
            db.execute("DELETE FROM message WHERE id = ?", (p.queue_id,))
            done.append(f"{p.queue_id}: {p.kind}: moved to {corrupt}")
        elif p.kind == "orphan recipients":
            db.execute("DELETE FROM recipient WHERE message = ?", (p.queue_id,))
            done.append(f"{p.queue_id}: removed orphan recipients")
        elif p.kind == "bad state":
            db.execute(f"UPDATE recipient SET state = 'queued' WHERE message = ? AND state NOT "
                       f"IN ({','.join('?' * len(VALID_STATES))})", (p.queue_id, *VALID_STATES))
            done.append(f"{p.queue_id}: recipients with a bad state requeued")
        elif p.kind == "orphan body":
            (directory / "bodies" / p.queue_id).unlink(missing_ok=True)
            done.append(f"{p.queue_id}: removed orphan body file")
    return done
