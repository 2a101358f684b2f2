"""The queue manager: from the spool to next hops and back (Postfix's qmgr + smtp).

New mail arrives from the listener with its bytes still in memory, so the
common case never reads the spool back; deferred mail is picked up by a
periodic scan (``[queue] run_delay``), after a restart too.  Recipients are
routed, grouped per destination (next hop, and recipient domain for the
built-in ``direct`` hop) and handed to that destination's workers — at most
``max_connections`` of them, each keeping its connection for the next
message.  Every result goes back to the spool in the writer's group commit:
sent, deferred with exponential backoff, or bounced with a DSN queued in
the same transaction.  A message is removed when no recipient is pending.

"Active" lives only in memory: the spool keeps a recipient in delivery as
queued/deferred, so a crash at any point means one more attempt, never a
lost recipient (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from dataclasses import dataclass, field

from ..config import DIRECT, Config, NextHopConfig
from ..observe.maillog import MailLog
from ..observe.metrics import Metrics
from ..protocol.client import Transaction
from ..protocol.replies import Reply
from ..spool.model import FINAL_STATES, Envelope, RcptState, Recipient
from ..spool.store import RecipientUpdate, Spool, StoreError
from .bounce import Failure, build_dsn
from .client import Attempt, DeliveryError, HopConnection, open_connection
from .connect import FamilyMemory
from .credentials import Credentials, load_credentials
from .resolver import Resolver
from .router import Router

SCAN_BATCH = 500
LOAD_BATCH = 100  # messages read from the spool in one trip to its reader thread
MAX_IN_MEMORY = 20_000  # messages; beyond this new mail waits for the scan


def fmt_delay(seconds: float) -> str:
    """Postfix's style: two significant digits, ``0`` for tiny values."""
    if seconds < 0.01:
        return "0"
    if seconds < 10:
        return f"{seconds:.2g}"
    return str(round(seconds))


class TokenBucket:
    """Paces a next hop to its provider's sending quota (``max_rate``).

    No burst: one message every 1/rate seconds, because providers such as SES
    count a sliding second.  A throttling reply halves the pace for a minute.
    """

    SLOW_FOR = 60.0

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = 1.0
        self.updated = time.monotonic()
        self.factor = 1.0
        self.slow_until = 0.0
        self.waited = 0.0

    @property
    def current(self) -> float:
        return self.rate * self.factor

    async def acquire(self) -> float:
        waited = 0.0
        while True:
            now = time.monotonic()
            if self.factor != 1.0 and now >= self.slow_until:
                self.factor = 1.0
            self.tokens = min(1.0, self.tokens + (now - self.updated) * self.current)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                self.waited += waited
                return waited
            delay = (1.0 - self.tokens) / self.current
            await asyncio.sleep(delay)
            waited += delay

    def slow_down(self) -> None:
        self.factor = max(0.125, self.factor / 2)
        self.slow_until = time.monotonic() + self.SLOW_FOR


@dataclass
class HopHealth:
    """Circuit breaker state of one next hop."""

    failures: int = 0
    down: bool = False
    since: float = 0.0
    last_error: str = ""
    prober: asyncio.Task[None] | None = None


@dataclass
class Message:
    """A message the scheduler is working on (its pending jobs and its bytes)."""

    queue_id: str
    arrival: float
    sender: str
    sender_params: dict[str, str | None]
    data: bytes
    jobs_left: int = 0
    dotless: bool = False  # known to have no line that begins with "." (skip stuffing)
    total: int = 0  # all recipients of the message, when all were pending at submission


@dataclass
class Job:
    message: Message
    recipients: list[Recipient]
    destination: Destination
    picked: float
    reuse_retry: bool = False


@dataclass(slots=True)
class InFlight:
    """A message whose data is sent and whose final reply is still to be read."""

    job: Job
    attempt: Attempt
    started: float
    setup: float
    sending: float


@dataclass
class Destination:
    """One next hop (and, for ``direct``, one recipient domain): queue, workers, state."""

    hop: NextHopConfig
    domain: str
    jobs: deque[Job] = field(default_factory=deque)
    workers: int = 0
    idle: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    suspended_until: float = 0.0
    suspend_reply: Reply | None = None
    credentials: Credentials | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.hop.name, self.domain)


class Scheduler:
    def __init__(self, cfg: Config, spool: Spool, maillog: MailLog,
                 resolver: Resolver | None = None, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.spool = spool
        self.log = maillog
        self.router = Router(cfg.relay)
        self.resolver = resolver or Resolver(cfg.hosts_file)
        self.memory = FamilyMemory()
        self.helo = cfg.delivery.helo_name or cfg.node.hostname
        self.messages: dict[str, Message] = {}
        self.destinations: dict[tuple[str, str], Destination] = {}
        self.cancelled: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._scan_wake = asyncio.Event()
        self._scanner: asyncio.Task[None] | None = None
        self._stopping = False
        self.credentials = self.load_credentials(cfg)
        self.hop_health: dict[str, HopHealth] = {name: HopHealth() for name in cfg.nexthops}
        self.buckets: dict[str, TokenBucket] = {
            name: TokenBucket(hop.max_rate) for name, hop in cfg.nexthops.items() if hop.max_rate}

    @staticmethod
    def load_credentials(cfg: Config) -> dict[str, Credentials]:
        """Every hop's credentials, read now (raises on a bad file: fail early)."""
        return {name: load_credentials(hop.credentials, hop.host, hop.port, hop.mx)
                for name, hop in cfg.nexthops.items() if hop.credentials is not None}

    def reconfigure(self, cfg: Config, credentials: dict[str, Credentials]) -> None:
        """A reload: new routes and hops for new work; jobs already queued keep theirs."""
        self.cfg = cfg
        self.router = Router(cfg.relay)
        self.resolver = Resolver(cfg.hosts_file)
        self.helo = cfg.delivery.helo_name or cfg.node.hostname
        self.credentials = credentials
        for name, hop in cfg.nexthops.items():
            self.hop_health.setdefault(name, HopHealth())
            bucket = self.buckets.get(name)
            if hop.max_rate and (bucket is None or bucket.rate != hop.max_rate):
                self.buckets[name] = TokenBucket(hop.max_rate)
            elif not hop.max_rate:
                self.buckets.pop(name, None)
        for (name, _), dest in list(self.destinations.items()):
            hop = cfg.nexthops.get(name)
            if hop is not None:
                dest.hop, dest.credentials = hop, credentials.get(name)
                dest.suspended_until = 0.0
        self.wake()

    # -- lifecycle --------------------------------------------------------
    def start(self) -> None:
        if self.cfg.queue.hold_delivery:
            self.log.emit("qmgr", "hold_delivery = true: mail is queued, not delivered")
            self._stopping = True
            return
        self._scanner = asyncio.create_task(self._scan_loop())

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking work; let transactions in progress finish (up to ``grace``)."""
        self._stopping = True
        for dest in self.destinations.values():
            dest.jobs.clear()
            dest.wake.set()
        if self._scanner is not None:
            self._scanner.cancel()
        for health in self.hop_health.values():
            if health.prober is not None:
                health.prober.cancel()
        deadline = time.monotonic() + grace
        while self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def wake(self) -> None:
        """Look at the spool now and forget suspended destinations (flush, release, requeue):
        an operator who says "try now" means it."""
        for dest in self.destinations.values():
            dest.suspended_until = 0.0
        self._scan_wake.set()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- intake -------------------------------------------------------------
    def submit_new(self, queue_id: str, env: Envelope, data: bytes, arrival: float,
                   dotless: bool = False) -> None:
        """A message the listener just committed; its bytes are still in memory."""
        if self._stopping or queue_id in self.messages:
            return
        if len(self.messages) >= MAX_IN_MEMORY:
            self._scan_wake.set()  # too much in flight: the scan will pick it up later
            return
        for i, rcpt in enumerate(env.recipients):
            rcpt.idx = i
        self._submit(Message(queue_id, arrival, env.sender, dict(env.sender_params), data,
                             total=len(env.recipients), dotless=dotless), env.recipients)

    def _submit(self, message: Message, recipients: list[Recipient]) -> None:
        now = time.monotonic()
        self.messages[message.queue_id] = message
        groups: dict[tuple[str, str], list[Recipient]] = {}
        for rcpt in recipients:
            hop = self.cfg.nexthops[self.usable(self.router.route(rcpt.address,
                                                                  message.sender).hop)]
            domain = rcpt.address.rpartition("@")[2].lower() if hop.name == DIRECT else ""
            groups.setdefault((hop.name, domain), []).append(rcpt)
        jobs = []
        for (hop_name, domain), rcpts in groups.items():
            dest = self._destination(self.cfg.nexthops[hop_name], domain)
            step = dest.hop.max_recipients
            jobs += [Job(message, rcpts[i : i + step], dest, now)
                     for i in range(0, len(rcpts), step)]
        message.jobs_left = len(jobs)
        for job in jobs:
            self._enqueue(job)

    def usable(self, name: str, seen: tuple[str, ...] = ()) -> str:
        """``name``, or while it is down the first of its fallbacks that is not."""
        health = self.hop_health.get(name)
        if health is None or not health.down:
            return name
        for other in self.cfg.nexthops[name].fallback:
            if other in seen:
                continue
            chosen = self.usable(other, (*seen, name))
            if not self.hop_health[chosen].down:
                return chosen
        return name  # everything is down: stay, and defer

    def _destination(self, hop: NextHopConfig, domain: str) -> Destination:
        key = (hop.name, domain)
        dest = self.destinations.get(key)
        if dest is None:
            dest = Destination(hop, domain, credentials=self.credentials.get(hop.name))
            self.destinations[key] = dest
        return dest

    def _enqueue(self, job: Job, front: bool = False) -> None:
        dest = job.destination
        if front:
            dest.jobs.appendleft(job)
        else:
            dest.jobs.append(job)
        if dest.idle:
            dest.wake.set()
        elif dest.workers < dest.hop.max_connections:
            dest.workers += 1
            self._spawn(self._worker(dest))

    async def _scan_loop(self) -> None:
        while True:
            try:
                await self._scan()
            except (StoreError, OSError) as exc:
                self.log.warning("qmgr", f"queue scan failed: {exc}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._scan_wake.wait(), self.cfg.queue.run_delay)
            self._scan_wake.clear()

    async def _scan(self) -> None:
        now = time.time()
        due = await self.spool.due(now, SCAN_BATCH)
        room = MAX_IN_MEMORY - len(self.messages)
        wanted = [q for q in due if q not in self.messages][:max(0, room)]
        for start in range(0, len(wanted), LOAD_BATCH):
            if self._stopping:
                return
            for qm, data in await self.spool.load_due(wanted[start:start + LOAD_BATCH], now):
                if qm.queue_id in self.messages or self._stopping:
                    continue
                self.cancelled.discard(qm.queue_id)
                env = qm.envelope
                self._submit(Message(qm.queue_id, qm.arrival, env.sender, env.sender_params,
                                     data), env.recipients)

    # -- workers ------------------------------------------------------------
    def _next_job(self, dest: Destination) -> Job | None:
        while dest.jobs:
            job = dest.jobs.popleft()
            if job.message.queue_id in self.cancelled:
                self._job_done(job)
                continue
            return job
        return None

    async def _worker(self, dest: Destination) -> None:
        conn: HopConnection | None = None
        flight: InFlight | None = None
        try:
            while not self._stopping:
                job = self._next_job(dest)
                if flight is not None and (job is None or not self._can_chain(dest, conn)):
                    conn = await self._complete(flight, conn)
                    flight = None
                    if job is None:
                        continue  # more may have come while the reply was awaited
                if job is None:
                    dest.idle += 1
                    dest.wake.clear()
                    try:
                        await asyncio.wait_for(dest.wake.wait(), self.cfg.delivery.idle_time)
                    except TimeoutError:
                        break
                    finally:
                        dest.idle -= 1
                    continue
                if dest.suspended_until > time.monotonic() and dest.suspend_reply is not None:
                    self._fail(job, dest.suspend_reply, "none", time.monotonic(), 0.0)
                    continue
                conn, flight = await self._deliver(dest, job, conn, flight)
            if flight is not None:  # stopping: hear the last answer, or it is sent twice
                conn = await self._complete(flight, conn)
        finally:
            dest.workers -= 1
            if conn is not None:
                conn.close()

    def _can_chain(self, dest: Destination, conn: HopConnection | None) -> bool:
        """May the next envelope go out before the last message's final reply is in?

        RFC 2920 lets message data start a pipelined group, so on a
        PIPELINING connection a message costs one round trip instead of
        two: the data of one and the envelope of the next travel together.
        Not on a paced hop, where the next message must wait for its slot
        anyway and the last result should not wait with it.
        """
        return (conn is not None and conn.usable and conn.conn.caps.pipelining
                and dest.hop.name not in self.buckets)

    async def _deliver(self, dest: Destination, job: Job, conn: HopConnection | None,
                       flight: InFlight | None) -> tuple[HopConnection | None, InFlight | None]:
        """Send ``job``; returns the connection to keep and the message still in flight.

        ``flight`` (only on a connection where :meth:`_can_chain`) is the
        previous message, whose final reply is read after this envelope is written.
        """
        started = time.monotonic()
        setup = 0.0
        if conn is None or not conn.usable:
            if conn is not None:
                conn.close()
            try:
                conn = await open_connection(dest.hop, self.cfg.delivery, self.resolver,
                                             self.memory, self.helo, dest.domain,
                                             dest.credentials)
            except DeliveryError as exc:
                if not exc.reply.is_permanent and self._hop_failed(dest, exc.reply):
                    self._reroute(dest, job)  # down, and a fallback can take the mail
                    return None, None
                self._fail(job, exc.reply, exc.relay, started, time.monotonic() - started)
                if not exc.reply.is_permanent:
                    self._suspend(dest, exc.reply)
                return None, None
            self.hop_health[dest.hop.name].failures = 0
            setup = conn.setup_seconds
            fresh = True
        else:
            fresh = False
        sending = time.monotonic()
        message = job.message
        addresses = [r.address for r in job.recipients]
        utf8 = "SMTPUTF8" in message.sender_params
        problem = self._cannot_send(conn, message, utf8)
        if problem is not None:
            self._fail(job, problem, conn.relay, started, setup)
            return conn, flight
        bucket = self.buckets.get(dest.hop.name)
        if bucket is not None:
            waited = await bucket.acquire()  # the mail waits in the queue, never refused
            if self.metrics is not None and waited:
                self.metrics.rate_wait.labels(dest.hop.name).inc(waited)
        try:
            if not conn.conn.caps.pipelining:
                tx = await conn.send(message.sender, message.sender_params, addresses,
                                     message.data, checked=True)
                self._sent(job, tx, conn, started, setup, sending)
                return (conn if conn.usable else None), None
            attempt = conn.start(message.sender, message.sender_params, addresses,
                                 message.data, checked=True, dotless=message.dotless)
        except DeliveryError as exc:  # the connection is gone, or the envelope is unsendable
            if flight is not None:
                await self._complete(flight, conn)
            return self._failed_send(job, exc, conn, fresh, started, setup, sending), None
        if flight is not None and await self._complete(flight, conn) is None:
            self._enqueue(job, front=True)  # never answered: not an attempt, try again
            return None, None
        try:
            await conn.envelope(attempt)
            if attempt.sent_data:
                return conn, InFlight(job, attempt, started, setup, sending)
            tx = await conn.end(attempt)
        except DeliveryError as exc:
            return self._failed_send(job, exc, conn, fresh, started, setup, sending), None
        self._sent(job, tx, conn, started, setup, sending)
        return (conn if conn.usable else None), None

    async def _complete(self, flight: InFlight, conn: HopConnection | None
                        ) -> HopConnection | None:
        """Read ``flight``'s final reply and record it; the connection, if still good."""
        assert conn is not None
        try:
            tx = await conn.end(flight.attempt, reset=False)
        except DeliveryError as exc:
            conn.close()
            self._fail(flight.job, exc.reply, exc.relay, flight.started, flight.setup,
                       transmit=time.monotonic() - flight.sending)
            return None
        self._sent(flight.job, tx, conn, flight.started, flight.setup, flight.sending)
        return conn if conn.usable else None

    def _failed_send(self, job: Job, exc: DeliveryError, conn: HopConnection, fresh: bool,
                     started: float, setup: float, sending: float) -> None:
        conn.close()  # replies and commands may no longer pair up
        if not fresh and not job.reuse_retry and "MAIL FROM" in exc.reply.text:
            job.reuse_retry = True  # the server dropped an idle connection: retry fresh
            self._enqueue(job, front=True)
            return
        self._fail(job, exc.reply, exc.relay, started, setup,
                   transmit=time.monotonic() - sending)

    def _sent(self, job: Job, tx: Transaction, conn: HopConnection, started: float,
              setup: float, sending: float) -> None:
        outcomes = [(r.status, r.reply,
                     r.reply.text if r.status == "sent" else conn.said(r.reply, r.stage))
                    for r in tx.results()]
        self._finish(job, outcomes, conn.relay, conn.target.host, started, setup,
                     time.monotonic() - sending)

    def _cannot_send(self, conn: HopConnection, message: Message, utf8: bool) -> Reply | None:
        caps = conn.conn.caps
        if utf8 and not caps.smtputf8:
            return Reply.of(550, "5.6.7", f"SMTPUTF8 is required, but was not offered by "
                            f"host {conn.relay}")
        if caps.size and len(message.data) > caps.size:
            return Reply.of(552, "5.3.4", f"message size {len(message.data)} exceeds size "
                            f"limit {caps.size} of server {conn.relay}")
        return None

    def _hop_failed(self, dest: Destination, reply: Reply) -> bool:
        """Count a failed connection; True if the hop is down and a fallback is usable."""
        hop = dest.hop
        health = self.hop_health[hop.name]
        health.failures += 1
        health.last_error = " ".join(reply.lines)
        if not health.down and health.failures >= hop.failure_threshold and hop.host:
            health.down, health.since = True, time.monotonic()
            self.log.emit("qmgr", f"warning: next hop {hop.name} is down after "
                          f"{health.failures} failed connection(s): {health.last_error}")
            if self.metrics is not None:
                self.metrics.hop_up.labels(hop.name).set(0)
            health.prober = asyncio.ensure_future(self._probe(hop))
        return health.down and self.usable(hop.name) != hop.name

    def _reroute(self, dest: Destination, job: Job) -> None:
        """Hand a down hop's queued jobs to its fallback (job IDs and bytes unchanged)."""
        target = self.cfg.nexthops[self.usable(dest.hop.name)]
        jobs = [job, *dest.jobs]
        dest.jobs.clear()
        for moved in jobs:
            moved.destination = self._destination(target, dest.domain)
            self._enqueue(moved)
        self.log.emit("qmgr", f"next hop {dest.hop.name} is down: {len(jobs)} job(s) go to "
                      f"fallback {target.name}")

    async def _probe(self, hop: NextHopConfig) -> None:
        """Try a down hop now and then; when it answers, traffic returns to it."""
        health = self.hop_health[hop.name]
        while not self._stopping:
            await asyncio.sleep(hop.probe_interval)
            try:
                conn = await open_connection(hop, self.cfg.delivery, self.resolver, self.memory,
                                             self.helo, "", self.credentials.get(hop.name))
            except DeliveryError as exc:
                health.last_error = " ".join(exc.reply.lines)
                continue
            conn.close()
            health.down, health.failures = False, 0
            self.log.emit("qmgr", f"next hop {hop.name} is up again after "
                          f"{time.monotonic() - health.since:.0f}s; traffic returns to it")
            if self.metrics is not None:
                self.metrics.hop_up.labels(hop.name).set(1)
            for dest in self.destinations.values():
                if dest.hop.name == hop.name:
                    dest.suspended_until = 0.0
            self.wake()
            return

    def _suspend(self, dest: Destination, reply: Reply) -> None:
        """After a failed connection, defer the destination's queue at once (Postfix
        "delivery temporarily suspended") instead of trying every message in turn."""
        delay = min(self.cfg.queue.min_backoff, 60.0)
        dest.suspended_until = time.monotonic() + delay
        if self.metrics is not None:
            self.metrics.hop_up.labels(dest.hop.name).set(0)
        text = " ".join(reply.lines)
        if not text.startswith("delivery temporarily suspended"):
            text = f"delivery temporarily suspended: {text}"
        dest.suspend_reply = Reply(reply.code, reply.enhanced, (text,))
        now = time.monotonic()
        while dest.jobs:
            job = dest.jobs.popleft()
            self._fail(job, dest.suspend_reply, "none", now, 0.0)

    # -- outcomes -----------------------------------------------------------
    def _backoff(self, attempts: int) -> float:
        q = self.cfg.queue
        delay = min(q.max_backoff, q.min_backoff * (2 ** max(0, attempts - 1)))
        return delay * random.uniform(0.9, 1.1)

    def _outcome(self, message: Message, rcpt: Recipient, status: str, dsn: str,
                 text: str, remote: str) -> tuple[RecipientUpdate, Failure | None]:
        attempts = rcpt.attempts + 1
        if status == "sent":
            return RecipientUpdate(rcpt.idx, RcptState.SENT, attempts, 0.0, text), None
        if status == "deferred":
            age = time.time() - message.arrival
            if age < self.cfg.queue.lifetime:
                return RecipientUpdate(rcpt.idx, RcptState.DEFERRED, attempts,
                                       time.time() + self._backoff(attempts), text), None
            text = f"{text} (delivery attempts stopped: message expired after " \
                f"{fmt_delay(age)}s in the queue)"
        failure = Failure(rcpt.address, dsn, text, remote)
        return RecipientUpdate(rcpt.idx, RcptState.BOUNCED, attempts, 0.0, text), failure

    def _fail(self, job: Job, reply: Reply, relay: str, started: float, setup: float,
              transmit: float = 0.0) -> None:
        """The whole job got one answer (connection failure, policy, suspension)."""
        status = "deferred" if reply.is_transient or reply.code < 400 else "bounced"
        text = " ".join(reply.lines)  # our own description, Postfix-style, without a code
        remote = "" if relay == "none" else relay.split("[")[0]
        self._finish(job, [(status, reply, text)] * len(job.recipients), relay, remote,
                     started, setup, transmit)

    def _finish(self, job: Job, outcomes: list[tuple[str, Reply, str]], relay: str,
                remote: str, started: float, setup: float, transmit: float) -> None:
        """Log one line per recipient (as Postfix's smtp does) and record the results."""
        message = job.message
        total = time.time() - message.arrival
        before = max(0.0, total - (time.monotonic() - job.picked))  # arrival -> picked
        in_qmgr = max(0.0, started - job.picked)
        delays = "/".join(fmt_delay(x) for x in (before, in_qmgr, setup, transmit))
        updates, failures = [], []
        expired = False
        for rcpt, (status, reply, text) in zip(job.recipients, outcomes, strict=True):
            dsn = reply.enhanced or ("2.0.0" if reply.code < 400 else
                                     "4.0.0" if reply.code < 500 else "5.0.0")
            update, failure = self._outcome(message, rcpt, status, dsn, text, remote)
            updates.append(update)
            if failure is not None:
                failures.append(failure)
            expired |= status == "deferred" and update.state is RcptState.BOUNCED
            if status == "deferred" and any(p in text for p in
                                            job.destination.hop.throttle_replies):
                self._throttled(job.destination.hop, text)
            if self.metrics is not None:
                hop = job.destination.hop.name
                self.metrics.deliveries.labels(hop, update.state.value).inc()
                if update.state is not RcptState.DEFERRED:
                    self.metrics.delay.labels(hop).observe(total)
                if status == "sent":
                    self.metrics.hop_up.labels(hop).set(1)
            self.log.emit(  # an expired recipient logs this attempt as deferred, like Postfix
                "smtp", f"to=<{rcpt.address}>, relay={relay}, delay={fmt_delay(total)}, "
                f"delays={delays}, dsn={dsn}, status={status} ({text})", message.queue_id,
                to=rcpt.address, relay=relay, delay=round(total, 3), dsn=dsn,
                status=update.state.value, reply=text)
        if expired:  # Postfix's wording, so that log tools recognise it
            self.log.emit("qmgr", f"from=<{message.sender}>, status=expired, returned to "
                          "sender", message.queue_id)
        self._spawn(self._record(job, updates, failures))

    async def _record(self, job: Job, updates: list[RecipientUpdate],
                      failures: list[Failure]) -> None:
        message = job.message
        bounce = None
        bounce_id = None
        if failures and message.sender:  # never bounce a bounce (null sender)
            bounce_id = self.spool.ids.next()
            data = build_dsn(reporting_mta=self.cfg.node.hostname, queue_id=message.queue_id,
                             sender=message.sender, arrival=message.arrival, failures=failures,
                             original=message.data, utf8="SMTPUTF8" in message.sender_params)
            # The DSN may carry UTF-8 text (8BITMIME); it needs SMTPUTF8 only when the
            # address it goes to does, so a hop without SMTPUTF8 can still take it.
            params: dict[str, str | None] = {"BODY": "8BITMIME"}
            if not message.sender.isascii():
                params["SMTPUTF8"] = None
            env = Envelope(sender="", recipients=[Recipient(message.sender)],
                           sender_params=params,
                           client_addr="127.0.0.1", client_name="localhost",
                           protocol="local", listener="bounce",
                           message_id=f"<bounce-{message.queue_id}>")
            bounce = (self.spool.prepare(bounce_id, env, data), env, data)
        try:
            whole = (message.total == len(updates)
                     and all(u.state in FINAL_STATES for u in updates))
            removed = await self.spool.record(message.queue_id, updates,
                                              bounce[0] if bounce else None, whole=whole)
        except StoreError as exc:
            # The results are lost, the message is not: it stays pending and is retried.
            self.log.warning("qmgr", f"{message.queue_id}: cannot record delivery status: {exc}")
            self._job_done(job)
            return
        if bounce is not None and bounce_id is not None:
            if self.metrics is not None:
                self.metrics.bounces.inc()
            self.log.emit("bounce", f"sender non-delivery notification: {bounce_id}",
                          message.queue_id)
            _, env, data = bounce
            self.log.emit("qmgr", f"from=<>, size={len(data)}, nrcpt=1 (queue active)",
                          bounce_id, sender="", size=len(data), nrcpt=1)
            self.submit_new(bounce_id, env, data, time.time())
        if removed:
            self.log.emit("qmgr", "removed", message.queue_id)
        self._job_done(job)

    def _job_done(self, job: Job) -> None:
        message = job.message
        message.jobs_left -= 1
        if message.jobs_left <= 0 and self.messages.get(message.queue_id) is message:
            del self.messages[message.queue_id]

    def _throttled(self, hop: NextHopConfig, text: str) -> None:
        bucket = self.buckets.get(hop.name)
        if bucket is None:
            return
        if bucket.factor == 1.0 or time.monotonic() > bucket.slow_until - bucket.SLOW_FOR + 1:
            bucket.slow_down()
            self.log.emit("qmgr", f"warning: next hop {hop.name} is throttling ({text[:120]}); "
                          f"pacing at {bucket.current:.3g}/s for {bucket.SLOW_FOR:.0f}s")

    def status(self) -> dict[str, dict[str, object]]:
        """Per next hop: state, last error, pace, queued jobs (``mailhop status``)."""
        out: dict[str, dict[str, object]] = {}
        now = time.monotonic()
        for name, hop in self.cfg.nexthops.items():
            health = self.hop_health.get(name, HopHealth())
            dests = [d for d in self.destinations.values() if d.hop.name == name]
            suspended = any(d.suspended_until > now for d in dests)
            bucket = self.buckets.get(name)
            out[name] = {
                "target": hop.label, "state": "down" if health.down else
                "suspended" if suspended else "up",
                "consecutive_failures": health.failures, "last_error": health.last_error,
                "fallback": list(hop.fallback),
                "max_rate": hop.max_rate, "current_rate": bucket.current if bucket else None,
                "rate_wait_seconds": round(bucket.waited, 3) if bucket else 0.0,
                "queued_jobs": sum(len(d.jobs) for d in dests),
                "connections": sum(d.workers for d in dests),
            }
        return out

    def health(self) -> list[str]:
        """Problems for /healthz: every next hop in use is suspended (no working path)."""
        used = list(self.destinations.values())
        now = time.monotonic()
        down = [d for d in used if d.suspended_until > now]
        if used and len(down) == len(used):
            return ["no usable next hop: " + "; ".join(
                f"{d.hop.name}: {' '.join(d.suspend_reply.lines) if d.suspend_reply else '?'}"
                for d in down)]
        return []

    # -- control --------------------------------------------------------------
    def cancel(self, queue_ids: list[str]) -> None:
        """Held or deleted: drop queued jobs (a transaction in progress still finishes)."""
        self.cancelled.update(queue_ids)
