"""The durable spool: SQLite (WAL, ``synchronous=FULL``) with group commit.

Why this shape (measured reasons in ``shared/DESIGN.md``): one transaction
per message tops out at a few thousand commits a second because every
commit is an fsync; one writer thread that commits whatever is waiting as
one batch turns N fsyncs into one while each session still waits for *its*
message's commit before answering 250.  ``synchronous=NORMAL`` would be
faster and can lose acknowledged mail on power loss, so it is not an option.

Bodies larger than ``INLINE_LIMIT`` go to files next to the database; the
writer fsyncs each file and the directory before the commit that makes the
row visible, so a committed row always has its body and an uncommitted
body file is an orphan that :meth:`Spool.open` removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .model import Envelope, QueuedMessage, RcptState, Recipient
from .queueid import QueueIdGenerator

T = TypeVar("T")

INLINE_LIMIT = 1 << 20
PAGE_SIZE = 16384
MAX_BATCH = 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id            TEXT PRIMARY KEY,
    arrival       REAL NOT NULL,
    size          INTEGER NOT NULL,
    sender        TEXT NOT NULL,
    sender_params TEXT NOT NULL,
    client_addr   TEXT NOT NULL,
    client_name   TEXT NOT NULL,
    helo          TEXT NOT NULL,
    protocol      TEXT NOT NULL,
    auth_user     TEXT,
    listener      TEXT NOT NULL,
    message_id    TEXT NOT NULL,
    held          INTEGER NOT NULL DEFAULT 0,
    body          BLOB,
    body_file     TEXT
);
CREATE TABLE IF NOT EXISTS recipient (
    message      TEXT NOT NULL REFERENCES message(id) ON DELETE CASCADE,
    idx          INTEGER NOT NULL,
    address      TEXT NOT NULL,
    params       TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_reply   TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (message, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recipient_due ON recipient(state, next_attempt);
"""


class StoreError(Exception):
    """The spool could not make a message durable; the client must retry later."""

    def __init__(self, message: str, *, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


class SpoolLocked(Exception):
    """Another process already runs a node on this spool."""


def _classify(exc: BaseException) -> StoreError:
    text = str(exc)
    full = (
        isinstance(exc, sqlite3.OperationalError) and "full" in text
    ) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))
    return StoreError(text, full=full)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    # 16 KiB pages (new spools only; WAL fixes the size at creation): a typical message
    # fits in its row instead of a chain of 4 KiB overflow pages, and every page is one
    # WAL frame, two writes and one checkpoint copy.  Measured: spool CPU per 100 KiB
    # message -40%, per 4 KiB message -5%.
    db.execute(f"PRAGMA page_size={PAGE_SIZE}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_INSERT_MESSAGE = (
    "INSERT INTO message (id, arrival, size, sender, sender_params, client_addr, client_name,"
    " helo, protocol, auth_user, listener, message_id, body, body_file)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
_INSERT_RECIPIENT = (
    "INSERT INTO recipient (message, idx, address, params, state) VALUES (?,?,?,?,?)")


def _params_json(params: dict[str, str | None]) -> str:
    return json.dumps(params) if params else "{}"


class _Insert:
    """A new message's rows, built on the event loop so the writer only executes them."""

    __slots__ = ("body_file", "data", "message", "recipients")

    def __init__(self, message: tuple[Any, ...], recipients: list[tuple[Any, ...]],
                 body_file: Path | None, data: bytes) -> None:
        self.message, self.recipients = message, recipients
        self.body_file, self.data = body_file, data


class _Job:
    __slots__ = ("error", "fn", "future", "insert", "loop", "result")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any] | None,
                 loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any],
                 insert: _Insert | None = None) -> None:
        self.fn = fn
        self.insert = insert
        self.loop = loop
        self.future = future
        self.result: Any = None
        self.error: BaseException | None = None


def _settle(jobs: list[_Job]) -> None:
    for job in jobs:
        if job.future.done():
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.result)


class Spool:
    """A node's queue on disk.  One :class:`Spool` (one writer) per directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.db_path = self.directory / "spool.db"
        self.body_dir = self.directory / "bodies"
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self.ids = QueueIdGenerator()
        self.commit_seconds = 0.0
        self.commits = 0
        self.min_free = 0
        self.on_commit: Callable[[float], None] | None = None  # e.g. a metrics histogram
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-reader")
        self._read_db: sqlite3.Connection | None = None

    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    # -- lifecycle --------------------------------------------------------
    def open(self) -> list[str]:
        """Lock the spool, create or recover it, start the writer.  Returns notes."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.body_dir.mkdir(exist_ok=True, mode=0o700)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"spool {self.directory} is in use by another mailhop") from None
        self._lock_fd = fd
        self._db = _connect(self.db_path)
        self._db.executescript(SCHEMA)
        notes = self._recover(self._db)
        newest = self._db.execute("SELECT max(id) FROM message").fetchone()[0]
        self.ids = QueueIdGenerator(newest)
        self._writer = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._writer.start()
        return notes

    def close(self) -> None:
        self._reader.shutdown(wait=True)
        if self._read_db is not None:
            self._read_db.close()
            self._read_db = None
        if self._writer is not None:
            self._jobs.put(None)
            self._writer.join()
            self._writer = None
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _recover(self, db: sqlite3.Connection) -> list[str]:
        """Make the spool consistent after any crash: the quick form of ``queue check``."""
        from .check import find_problems, repair

        problems = find_problems(db, self.directory, quick=True)
        # A body written but never committed was never acknowledged: remove it.
        orphans = [p for p in problems if p.kind == "orphan body"]
        notes = [f"removed uncommitted body {p.queue_id}" for p in orphans]
        repair(db, self.directory, orphans)
        others = [p for p in problems if p.kind != "orphan body"]
        if others:
            notes.append(f"{len(others)} problem(s) in the spool, e.g. {others[0].queue_id}: "
                         f"{others[0].kind}; run: mailhop queue check --repair")
        return notes

    # -- the writer -------------------------------------------------------
    def _run(self) -> None:
        db = self._db
        assert db is not None
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._commit(db, batch)
            if stop:
                return

    def _commit(self, db: sqlite3.Connection, batch: list[_Job]) -> None:
        started = time.monotonic()
        try:
            db.execute("BEGIN IMMEDIATE")
            messages: list[tuple[Any, ...]] = []
            recipients: list[tuple[Any, ...]] = []
            bodies = False
            for job in batch:
                insert = job.insert
                if insert is not None:
                    if insert.body_file is not None:
                        self._write_body(insert.body_file, insert.data)
                        bodies = True
                    messages.append(insert.message)
                    recipients.extend(insert.recipients)
                    continue
                self._insert_rows(db, messages, recipients)  # keep the batch's order
                assert job.fn is not None
                job.result = job.fn(db)
            self._insert_rows(db, messages, recipients)
            if bodies:
                _fsync_dir(self.body_dir)
            db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if len(batch) > 1:
                for job in batch:  # isolate the failing job; the others may be fine
                    self._commit(db, [job])
                return
            batch[0].error = _classify(exc)
        elapsed = time.monotonic() - started
        self.commit_seconds += elapsed
        self.commits += 1
        if self.on_commit is not None:
            self.on_commit(elapsed)
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        for job in batch:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(_settle, jobs)

    @staticmethod
    def _insert_rows(db: sqlite3.Connection, messages: list[tuple[Any, ...]],
                     recipients: list[tuple[Any, ...]]) -> None:
        if messages:
            db.executemany(_INSERT_MESSAGE, messages)
            db.executemany(_INSERT_RECIPIENT, recipients)
            messages.clear()
            recipients.clear()

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` inside the next group commit; return once it is durable."""
        if self._writer is None:
            raise StoreError("spool is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(fn, loop, future))
        return await future

    # -- operations -------------------------------------------------------
    def prepare(self, queue_id: str, env: Envelope, data: bytes) -> _Insert:
        """The rows (and body file) that store a new message."""
        large = len(data) > INLINE_LIMIT
        message = (queue_id, time.time(), len(data), env.sender, _params_json(env.sender_params),
                   env.client_addr, env.client_name, env.helo, env.protocol, env.auth_user,
                   env.listener, env.message_id, None if large else data,
                   queue_id if large else None)
        queued = RcptState.QUEUED.value
        recipients = [(queue_id, i, r.address, _params_json(r.params), queued)
                      for i, r in enumerate(env.recipients)]
        return _Insert(message, recipients, self.body_dir / queue_id if large else None, data)

    def insert_now(self, db: sqlite3.Connection, insert: _Insert) -> None:
        """Store a prepared message inside a write job (e.g. a bounce with its cause)."""
        if insert.body_file is not None:
            self._write_body(insert.body_file, insert.data)
            _fsync_dir(self.body_dir)
        self._insert_rows(db, [insert.message], list(insert.recipients))

    async def enqueue(self, queue_id: str, env: Envelope, data: bytes) -> None:
        """Store a message durably.  Raises :class:`StoreError` if it is not."""
        if self._writer is None:
            raise StoreError("spool is not open")
        insert = self.prepare(queue_id, env, data)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._jobs.put(_Job(None, loop, future, insert))
        await future

    # -- reads for the scheduler (one reader thread, its own connection) -------
    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._read_db is None:
            self._read_db = sqlite3.connect(self.db_path, timeout=5.0, check_same_thread=False)
            self._read_db.row_factory = sqlite3.Row
        db = self._read_db
        return asyncio.get_running_loop().run_in_executor(self._reader, fn, db)

    async def due(self, now: float, limit: int) -> list[str]:
        """IDs of unheld messages with a recipient due for an attempt, oldest first."""
        return await self._read(lambda db: [row[0] for row in db.execute(
            "SELECT DISTINCT r.message FROM recipient r JOIN message m ON m.id = r.message"
            " WHERE r.state IN ('queued', 'deferred') AND r.next_attempt <= ? AND m.held = 0"
            " ORDER BY r.message LIMIT ?", (now, limit))])

    async def load_due(self, queue_ids: list[str], now: float
                       ) -> list[tuple[QueuedMessage, bytes]]:
        """These messages, each with only its due, pending recipients, and its body.

        One trip to the reader thread for the lot: a scan after an outage
        or a flush hands the scheduler its whole batch at once.
        """
        def load_one(db: sqlite3.Connection, queue_id: str) -> tuple[QueuedMessage, bytes] | None:
            row = db.execute("SELECT * FROM message WHERE id = ? AND held = 0",
                             (queue_id,)).fetchone()
            if row is None:
                return None
            rcpts = [_row_to_recipient(r) for r in db.execute(
                "SELECT * FROM recipient WHERE message = ? AND state IN ('queued', 'deferred')"
                " AND next_attempt <= ? ORDER BY idx", (queue_id, now))]
            if not rcpts:
                return None
            body = (bytes(row["body"]) if row["body_file"] is None
                    else (self.body_dir / row["body_file"]).read_bytes())
            return _row_to_message(row, rcpts), body

        def load(db: sqlite3.Connection) -> list[tuple[QueuedMessage, bytes]]:
            return [m for m in (load_one(db, q) for q in queue_ids) if m is not None]
        return await self._read(load)

    async def stats(self) -> dict[str, int]:
        return await self._read(lambda db: dict(db.execute(
            "SELECT state, count(*) FROM recipient GROUP BY state").fetchall()))

    # -- results ---------------------------------------------------------------
    async def record(self, queue_id: str, updates: list[RecipientUpdate],
                     bounce: _Insert | None = None, whole: bool = False) -> bool:
        """Store delivery results (and a bounce, atomically); True if the message is done.

        ``whole``: the caller knows ``updates`` are final results for every recipient
        the message has, so it can go at once (the common case: one delivery, all sent).
        """
        def apply(db: sqlite3.Connection) -> str | bool:
            if bounce is not None:
                self.insert_now(db, bounce)
            if whole:
                gone = db.execute("DELETE FROM message WHERE id = ? RETURNING body_file",
                                  (queue_id,)).fetchone()
                return (gone[0] or True) if gone is not None else False
            db.executemany(
                "UPDATE recipient SET state = ?, attempts = ?, next_attempt = ?, last_reply = ?"
                " WHERE message = ? AND idx = ?",
                [(u.state.value, u.attempts, u.next_attempt, u.last_reply, queue_id, u.idx)
                 for u in updates])
            row = db.execute(
                "SELECT m.body_file, (SELECT count(*) FROM recipient r WHERE r.message = m.id"
                " AND r.state IN ('queued', 'deferred')) FROM message m WHERE m.id = ?",
                (queue_id,)).fetchone()
            if row is None or row[1]:
                return False  # still pending, or deleted meanwhile (queue delete)
            db.execute("DELETE FROM message WHERE id = ?", (queue_id,))
            return row[0] or True
        done = await self.write(apply)
        if isinstance(done, str):
            (self.body_dir / done).unlink(missing_ok=True)  # after the commit, never before
        return bool(done)

    @staticmethod
    def _write_body(path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


# -- reading (CLI, delivery) -------------------------------------------------

@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    idx: int
    state: RcptState
    attempts: int
    next_attempt: float
    last_reply: str


def _row_to_recipient(r: sqlite3.Row) -> Recipient:
    return Recipient(r["address"], json.loads(r["params"]), RcptState(r["state"]), r["attempts"],
                     r["next_attempt"], r["last_reply"], r["idx"])


def _row_to_message(row: sqlite3.Row, recipients: list[Recipient]) -> QueuedMessage:
    env = Envelope(
        sender=row["sender"], recipients=recipients,
        sender_params=json.loads(row["sender_params"]), client_addr=row["client_addr"],
        client_name=row["client_name"], helo=row["helo"], protocol=row["protocol"],
        auth_user=row["auth_user"], listener=row["listener"], message_id=row["message_id"],
    )
    return QueuedMessage(row["id"], row["arrival"], row["size"], env, bool(row["held"]))


class SpoolReader:
    """Read-only view for tools; safe while a node is writing (WAL readers)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        path = self.directory / "spool.db"
        if not path.exists():
            raise FileNotFoundError(f"no spool at {self.directory}")
        self._db = sqlite3.connect(path, timeout=5.0)
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        self._db.close()

    def _recipients(self, queue_id: str) -> list[Recipient]:
        return [_row_to_recipient(r) for r in self._db.execute(
            "SELECT * FROM recipient WHERE message = ? ORDER BY idx", (queue_id,))]

    def messages(self) -> Iterator[QueuedMessage]:
        rows = self._db.execute(
            "SELECT id, arrival, size, sender, sender_params, client_addr, client_name, helo,"
            " protocol, auth_user, listener, message_id, held FROM message ORDER BY id"
        ).fetchall()
        for row in rows:
            yield _row_to_message(row, self._recipients(row["id"]))

    def get(self, queue_id: str) -> QueuedMessage | None:
        row = self._db.execute("SELECT * FROM message WHERE id = ?", (queue_id,)).fetchone()
        if row is None:
            return None
        return _row_to_message(row, self._recipients(queue_id))

    def body(self, queue_id: str) -> bytes | None:
        row = self._db.execute("SELECT body, body_file FROM message WHERE id = ?",
                               (queue_id,)).fetchone()
        if row is None:
            return None
        if row["body_file"]:
            return (self.directory / "bodies" / row["body_file"]).read_bytes()
        return bytes(row["body"])
