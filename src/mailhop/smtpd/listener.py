"""The SMTP listener: binds the sans-IO server engine to asyncio sockets.

One :class:`Session` per connection moves bytes between the transport and
the engine and answers the engine's questions: policy for MAIL/RCPT, the
user database for AUTH (in a worker thread: scrypt is slow on purpose), and
the spool for a finished message.  The reply to DATA is written only after
the spool's group commit holding the message returned, so every 250 is
durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Callable
from email.utils import formatdate

from ..config import ListenConfig
from ..observe.maillog import MailLog
from ..observe.metrics import Metrics
from ..protocol import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    AuthRequest,
    MailFrom,
    MessageReceived,
    RcptTo,
    Reply,
    ServerConfig,
    ServerConnection,
    StartTLS,
)
from ..protocol.server import State
from ..spool.model import Envelope, Recipient
from ..spool.store import Spool, StoreError
from .auth import UserDB
from .policy import AccessPolicy

MAX_HOPS = 50  # Postfix hopcount_limit; RFC 5321 6.3 asks for loop detection
PAUSE_ABOVE = 256 * 1024

_RECEIVED = re.compile(rb"(?im)^received:")
_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*([^\r\n]*)")
_UNSAFE = re.compile(r"[^\x21-\x7e]")

R_STORE_FULL = Reply.of(452, "4.3.1", "Insufficient system storage")
R_STORE_FAILED = Reply.of(451, "4.3.0", "Error: queue file write error")
R_LOOP = Reply.of(554, "5.4.6", "Error: too many hops (mail loop?)")
R_SHUTDOWN = Reply.of(421, "4.3.2", "Service shutting down, try again later")
R_TIMEOUT = Reply.of(421, "4.4.2", "Error: timeout exceeded")


_date_cache: tuple[int, str] = (-1, "")


def _rfc5322_date() -> str:
    """``Fri, 27 Nov 2026 18:38:54 +0000``, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, localtime=True))
    return _date_cache[1]


def _safe(text: str, limit: int = 255) -> str:
    """Header-safe form of client-supplied text: no controls, no spaces."""
    return _UNSAFE.sub("?", text)[:limit] or "?"


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class Listener:
    """One ``[[listen]]`` entry: its engine settings, policy, TLS and sessions."""

    def __init__(self, cfg: ListenConfig, hostname: str, spool: Spool, maillog: MailLog,
                 on_queued: Callable[[str, Envelope, bytes, float, bool], None] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.hostname = hostname
        self.spool = spool
        self.maillog = maillog
        self.on_queued = on_queued
        self.metrics = metrics
        self.configure(cfg)
        self.sessions: set[Session] = set()
        self.server: asyncio.base_events.Server | None = None
        self.accepting = True
        self._sweeper: asyncio.Task[None] | None = None
        self._free_checked = 0.0
        self._free_ok = True

    @staticmethod
    def check(cfg: ListenConfig) -> None:
        """Load what a listener needs from disk; raises OSError/ValueError if it cannot."""
        if cfg.tls:
            server_tls_context(str(cfg.tls.cert), str(cfg.tls.key))
        if cfg.users:
            UserDB.load(cfg.users)

    def configure(self, cfg: ListenConfig) -> None:
        """(Re)apply settings; sessions already running keep the ones they started with."""
        old = getattr(self, "policy", None)
        self.cfg = cfg
        self.policy = AccessPolicy(cfg)
        if old is not None:  # connection counts and AUTH failures carry over a reload
            self.policy.per_ip, self.policy.total = old.per_ip, old.total
            self.policy.auth_failures = old.auth_failures
        self.tls_context = server_tls_context(str(cfg.tls.cert), str(cfg.tls.key)) \
            if cfg.tls else None
        self.users = UserDB.load(cfg.users) if cfg.users else None
        self.engine_config = ServerConfig(
            hostname=self.hostname,
            max_message_size=cfg.max_message_size,
            max_recipients=cfg.max_recipients,
            tls_available=self.tls_context is not None,
            auth_mechanisms=("PLAIN", "LOGIN") if cfg.auth != "none" else (),
            allow_plaintext_auth=cfg.allow_plaintext_auth,
            require_tls=cfg.require_tls,
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Session(self), self.cfg.host, self.cfg.port, reuse_address=True,
            backlog=1024)
        self._sweeper = asyncio.create_task(self._sweep())

    @property
    def bound_port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        self.accepting = False
        if self.server is not None:
            self.server.close()

    async def drain(self, timeout: float) -> None:
        """Let sessions finish a message in flight; close idle ones now."""
        for session in list(self.sessions):
            if not session.busy:
                session.shutdown(R_SHUTDOWN)
        deadline = time.monotonic() + timeout
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            for session in list(self.sessions):
                if not session.busy:
                    session.shutdown(R_SHUTDOWN)
        for session in list(self.sessions):
            session.shutdown(R_SHUTDOWN)
        if self._sweeper is not None:
            self._sweeper.cancel()

    def has_room(self) -> bool:
        """Refuse MAIL early when the spool's disk is nearly full (Postfix queue_minfree)."""
        now = time.monotonic()
        if now - self._free_checked > 1.0:
            self._free_checked = now
            try:
                self._free_ok = self.spool.free_bytes() >= self.spool.min_free
            except OSError:
                self._free_ok = False
        return self._free_ok

    async def _sweep(self) -> None:
        """Close sessions idle for longer than the idle timeout, or stuck in DATA."""
        cfg = self.cfg
        interval = max(0.05, min(1.0, cfg.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for session in list(self.sessions):
                if session.waiting:
                    continue
                if now - session.last_activity > cfg.idle_timeout or (
                    session.data_started and now - session.data_started > cfg.data_timeout
                ):
                    self.maillog.emit("smtpd", f"timeout after {session.last_command} from "
                                      f"{session.client}")
                    session.shutdown(R_TIMEOUT)


class Session(asyncio.Protocol):
    __slots__ = (
        "_admitted", "addr", "auth_failures", "client", "conn", "counts", "data_started",
        "last_activity", "last_auth_mech", "last_command", "listener", "transport", "trusted",
        "waiting",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.conn = ServerConnection(listener.engine_config)
        self.addr = ""
        self.client = ""
        self.trusted = False
        self.waiting = False
        self.data_started = 0.0
        self.last_activity = time.monotonic()
        self.last_command = "CONNECT"
        self.auth_failures = 0
        self.last_auth_mech = ""
        self.counts: dict[str, int] = {}
        self._admitted = False

    @property
    def busy(self) -> bool:
        """In the middle of a message: draining must let it finish."""
        return self.waiting or self.conn.state is State.DATA

    # -- transport callbacks ----------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        self.addr = str(peer[0])
        self.client = f"unknown[{self.addr}]"
        lst = self.listener
        self.trusted = lst.policy.trusted(self.addr)
        lst.maillog.emit("smtpd", f"connect from {self.client}")
        refusal = R_SHUTDOWN if not lst.accepting else lst.policy.admit(self.addr, self.trusted)
        if refusal is not None:
            if lst.metrics is not None:
                lst.metrics.refused_connections.labels(lst.cfg.name).inc()
            lst.maillog.emit("smtpd", f"warning: {refusal.text} for {self.client}")
            self.conn.refuse(refusal)
            transport.write(self.conn.data_to_send())
            transport.close()
            return
        self._admitted = True
        lst.sessions.add(self)
        if lst.metrics is not None:
            lst.metrics.connections.labels(lst.cfg.name).inc()
            lst.metrics.active.labels(lst.cfg.name).inc()
        self.conn.greet()
        transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        lst = self.listener
        if self._admitted:
            self._admitted = False
            lst.policy.release(self.addr)
            lst.sessions.discard(self)
            if lst.metrics is not None:
                lst.metrics.active.labels(lst.cfg.name).dec()
        summary = " ".join(f"{k}={v}" for k, v in self.counts.items())
        total = sum(self.counts.values())
        lst.maillog.emit("smtpd", f"disconnect from {self.client}"
                         + (f" {summary} commands={total}" if total else ""))

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        self.conn.receive_data(data)
        if not self.waiting:
            self._pump()
        elif self.conn.buffered > PAUSE_ABOVE and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # close; a half-received message is simply never queued

    def shutdown(self, reply: Reply) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.conn.refuse(reply)
        self.transport.write(self.conn.data_to_send())
        self.transport.close()

    # -- engine driving -----------------------------------------------------
    def _pump(self) -> None:
        conn = self.conn
        transport = self.transport
        assert transport is not None
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            if event is CLOSED:
                transport.write(conn.data_to_send())
                transport.close()
                return
            if event is PAUSED:
                break
            if isinstance(event, RcptTo):
                self._count("rcpt")
                refusal = self.listener.policy.check_rcpt(event.recipient, self.trusted,
                                                          conn.authenticated)
                if refusal is None:
                    conn.accept()
                else:
                    self._log_reject("RCPT", refusal, event.recipient)
                    conn.reject(refusal)
            elif isinstance(event, MailFrom):
                self._count("mail")
                refusal = self._check_mail()
                if refusal is None:
                    conn.accept()
                else:
                    self._log_reject("MAIL", refusal, None, event.sender)
                    conn.reject(refusal)
            elif isinstance(event, MessageReceived):
                self._count("data")
                self._wait(self._store(event))
                break
            elif isinstance(event, AuthRequest):
                self._count("auth")
                self._wait(self._authenticate(event))
                break
            elif isinstance(event, StartTLS):
                self._count("starttls")
                transport.pause_reading()
                transport.write(conn.data_to_send())
                self._wait(self._start_tls())
                return
        if conn.state is State.DATA and not self.data_started:
            self.data_started = time.monotonic()
        out = conn.data_to_send()
        if out:
            transport.write(out)

    def _count(self, name: str) -> None:
        self.last_command = name.upper()
        self.counts[name] = self.counts.get(name, 0) + 1

    def _check_mail(self) -> Reply | None:
        lst = self.listener
        if not lst.accepting:
            return R_SHUTDOWN
        refusal = lst.policy.check_mail(self.conn.authenticated)
        if refusal is None and not lst.has_room():
            return R_STORE_FULL
        return refusal

    def _wait(self, coro: object) -> None:
        self.waiting = True
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        task.add_done_callback(self._resume)

    def _resume(self, task: asyncio.Future[None]) -> None:
        self.waiting = False
        self.last_activity = time.monotonic()
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                self.listener.maillog.warning("smtpd", f"internal error: {task.exception()!r}")
            self.shutdown(Reply.of(421, "4.3.0", "Error: internal error, try again later"))
            return
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        self._pump()

    # -- the questions ------------------------------------------------------
    async def _store(self, event: MessageReceived) -> None:
        conn = self.conn
        lst = self.listener
        self.data_started = 0.0
        body = event.data
        head_end = body.find(b"\r\n\r\n")
        headers = body if head_end < 0 else body[: head_end + 2]
        if len(_RECEIVED.findall(headers)) > MAX_HOPS:
            self._log_reject("END-OF-MESSAGE", R_LOOP, None, event.sender)
            conn.reject(R_LOOP)
            return
        match = _MESSAGE_ID.search(headers)
        message_id = match.group(1).decode("utf-8", "replace").strip() if match else ""
        queue_id = lst.spool.ids.next()
        protocol = ("ESMTP" if conn.esmtp else "SMTP") + ("S" if conn.tls else "") + (
            "A" if conn.authenticated else "")
        received = self._received_header(queue_id, protocol, event)
        env = Envelope(
            sender=event.sender,
            recipients=[Recipient(addr, dict(params)) for addr, params in event.recipients],
            sender_params=dict(event.sender_params), client_addr=self.addr,
            client_name="unknown", helo=conn.helo or "", protocol=protocol,
            auth_user=conn.authenticated, listener=lst.cfg.name, message_id=message_id,
        )
        data = received + body
        try:
            await lst.spool.enqueue(queue_id, env, data)
        except StoreError as exc:
            reply = R_STORE_FULL if exc.full else R_STORE_FAILED
            lst.maillog.warning("cleanup", f"{queue_id}: queue file write error: {exc}")
            conn.reject(reply)
            return
        conn.accept(f"Ok: queued as {queue_id}")
        if lst.metrics is not None:
            lst.metrics.received.labels(lst.cfg.name).inc()
        log = lst.maillog
        auth = (f", sasl_method={self.last_auth_mech}, sasl_username={conn.authenticated}"
                if conn.authenticated else "")
        log.emit("smtpd", f"client={self.client}{auth}", queue_id, client=self.addr)
        log.emit("cleanup", f"message-id={message_id}", queue_id, message_id=message_id)
        log.emit("qmgr", f"from=<{event.sender}>, size={len(data)}, nrcpt={len(env.recipients)}"
                 " (queue active)", queue_id, sender=event.sender, size=len(data),
                 nrcpt=len(env.recipients))
        if lst.on_queued is not None:
            lst.on_queued(queue_id, env, data, time.time(), event.dotless)

    def _received_header(self, queue_id: str, protocol: str, event: MessageReceived) -> bytes:
        conn = self.conn
        tls = ""
        if conn.tls and self.transport is not None:
            obj = self.transport.get_extra_info("ssl_object")
            if obj is not None:
                cipher = obj.cipher()
                tls = f"\r\n\t(using {obj.version()} with cipher {cipher[0] if cipher else '?'})"
        rcpt = f"\r\n\tfor <{event.recipients[0][0]}>" if len(event.recipients) == 1 else ""
        header = (
            f"Received: from {_safe(conn.helo or '')} (unknown [{self.addr}]){tls}\r\n"
            f"\tby {self.listener.hostname} (mailhop) with {protocol} id {queue_id}{rcpt};"
            f"\r\n\t{_rfc5322_date()}\r\n"
        )
        return header.encode("utf-8", "replace")

    async def _authenticate(self, event: AuthRequest) -> None:
        lst = self.listener
        users = lst.users
        ok = users is not None and await asyncio.to_thread(users.verify, event.username,
                                                           event.password)
        if ok:
            self.last_auth_mech = event.mechanism
            self.conn.accept()
            return
        self.auth_failures += 1
        lst.maillog.warning("smtpd", f"{self.client}: SASL {event.mechanism} authentication "
                            f"failed: user={_safe(event.username, 64)}")
        blocked = lst.policy.auth_failed(self.addr) and not self.trusted
        await asyncio.sleep(min(1.0, 0.25 * self.auth_failures))  # slow brute force down
        self.conn.reject(Reply.of(535, "5.7.8", "Error: authentication failed"))
        if blocked:
            lst.maillog.warning("smtpd", f"{self.client}: blocked for "
                                f"{lst.cfg.auth_block_time:.0f}s after repeated AUTH failures")
        if blocked or self.auth_failures >= lst.cfg.auth_failure_limit:
            self.shutdown(Reply.of(421, "4.7.0", "Error: too many authentication failures"))

    async def _start_tls(self) -> None:
        transport = self.transport
        ctx = self.listener.tls_context
        assert transport is not None and ctx is not None
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(transport, self, ctx, server_side=True,
                                       ssl_handshake_timeout=30.0)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            self.listener.maillog.emit("smtpd", f"SSL_accept error from {self.client}: {exc}")
            with contextlib.suppress(Exception):
                transport.abort()
            return
        if new is None:
            return
        self.transport = new  # type: ignore[assignment]
        self.conn.tls_established()

    def _log_reject(self, stage: str, reply: Reply, rcpt: str | None,
                    sender: str | None = None) -> None:
        conn = self.conn
        sender = conn.sender if sender is None else sender
        proto = "ESMTP" if conn.esmtp else "SMTP"
        to = f" to=<{rcpt}>" if rcpt is not None else ""
        if self.listener.metrics is not None:
            self.listener.metrics.rejected.labels(self.listener.cfg.name, stage).inc()
        self.listener.maillog.emit(
            "smtpd", f"NOQUEUE: reject: {stage} from {self.client}: {reply.text}; "
            f"from=<{sender or ''}>{to} proto={proto} helo=<{conn.helo or ''}>")
