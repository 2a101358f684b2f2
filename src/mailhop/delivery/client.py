"""The delivery client: the client engine bound to asyncio, with TLS and AUTH policy.

One :class:`HopConnection` is one SMTP connection to one host of a next
hop.  Opening it walks the hop's hosts (MX order) and, for each, all its
addresses (:func:`connect_staggered`); then greeting, EHLO, STARTTLS as the
hop's ``tls`` policy demands, EHLO again inside TLS, and AUTH.  The rules
that protect credentials are here and nowhere else:

* ``encrypt``/``verify``: no STARTTLS offered, or a failed handshake, is a
  deferral — the connection never continues in clear;
* credentials are sent only inside TLS (unless ``allow_plaintext_auth``),
  and only when the server offers AUTH after TLS (a stripped AUTH defers).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from dataclasses import dataclass

from ..config import DeliveryConfig, NextHopConfig
from ..protocol.client import ClientConnection, ClientProtocolError, Transaction
from ..protocol.replies import Reply
from .connect import ConnectFailed, FamilyMemory, connect_staggered
from .credentials import Credentials
from .resolver import LookupFailed, Resolver, Target


class DeliveryError(Exception):
    """The attempt failed before or outside a transaction; ``reply`` says how (4xx/5xx)."""

    def __init__(self, reply: Reply, relay: str = "none") -> None:
        super().__init__(reply.text)
        self.reply = reply
        self.relay = relay

    @property
    def dsn(self) -> str:
        return self.reply.enhanced or ("5.0.0" if self.reply.is_permanent else "4.0.0")


def _soft(reply: Reply) -> Reply:
    """The same reply as a temporary failure (for setup steps that must not bounce)."""
    if not reply.is_permanent:
        return reply
    enhanced = "4" + reply.enhanced[1:] if reply.enhanced else ""
    return Reply(450, enhanced, reply.lines)


def tls_context(hop: NextHopConfig) -> ssl.SSLContext:
    if hop.tls == "verify":
        ctx = ssl.create_default_context(cafile=str(hop.ca_file) if hop.ca_file else None)
    else:  # may / encrypt: encrypted, not authenticated (Postfix "encrypt")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _wake_up(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class ClientProtocol(asyncio.Protocol):
    """Feeds bytes to the client engine and queues the paired replies."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.replies: deque[tuple[str, Reply]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.error: str | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.replies.extend(self.conn.receive_data(data))
        except ClientProtocolError as exc:
            self.error = str(exc)
            if self.transport is not None:
                self.transport.abort()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


@dataclass(slots=True)
class Attempt:
    """One transaction on the wire: its replies so far and the data it carries."""

    tx: Transaction
    data: bytes
    checked: bool
    dotless: bool = False
    sent_data: bool = False


class HopConnection:
    def __init__(self, hop: NextHopConfig, settings: DeliveryConfig, target: Target,
                 address: str, proto: ClientProtocol, helo: str) -> None:
        self.hop = hop
        self.settings = settings
        self.target = target
        self.address = address
        self.proto = proto
        self.conn = proto.conn
        self.helo = helo
        self.last_used = time.monotonic()
        self.messages = 0
        self.setup_seconds = 0.0
        self._out: list[bytes] = []

    @property
    def relay(self) -> str:
        """``host[address]:port`` as Postfix logs it."""
        return f"{self.target.host}[{self.address}]:{self.hop.port}"

    @property
    def usable(self) -> bool:
        return not self.proto.closed and self.proto.error is None

    def _write(self, data: bytes) -> None:
        """Queue ``data``; it goes out, with whatever follows it, before the next read.

        Why: message data and the next envelope are written by different
        steps; corked together they cost one ``send`` and one segment.
        """
        if self.proto.transport is None or self.proto.closed:
            raise self._lost("sending")
        self._out.append(data)

    def _flush(self) -> None:
        if self._out:
            transport = self.proto.transport
            out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out.clear()
            if transport is not None and not self.proto.closed and not transport.is_closing():
                transport.write(out)

    def _lost(self, stage: str) -> DeliveryError:
        why = self.proto.error or "lost connection"
        return DeliveryError(Reply.of(451, "4.4.2", f"{why} with {self.relay} while {stage}"),
                             self.relay)

    async def _read(self, tag: str, timeout: float, stage: str) -> Reply:
        self._flush()
        proto = self.proto
        if not proto.replies:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not proto.replies:
                if proto.closed or proto.error:
                    raise self._lost(stage)
                if loop.time() >= deadline:
                    raise DeliveryError(Reply.of(451, "4.4.2", f"conversation with "
                                                 f"{self.relay} timed out while {stage}"),
                                        self.relay)
                waiter = proto.waiter = loop.create_future()
                timer = loop.call_at(deadline, _wake_up, waiter)  # cheaper than wait_for
                try:
                    await waiter
                finally:
                    timer.cancel()
                    proto.waiter = None
        got, reply = proto.replies.popleft()
        if got != tag:  # cannot happen unless the engine and binding disagree
            raise DeliveryError(Reply.of(451, "4.5.0", f"reply for {got}, expected {tag}"),
                                self.relay)
        return reply

    def said(self, reply: Reply, command: str) -> str:
        return f"host {self.relay} said: {reply.text} (in reply to {command} command)"

    # -- setup ----------------------------------------------------------------
    async def handshake(self, credentials: Credentials | None) -> None:
        """Greeting, EHLO, STARTTLS as the hop's policy says, AUTH if configured."""
        await self.greeting()
        await self.hello()
        policy = self.hop.tls
        if policy != "none":
            if self.conn.caps.starttls:
                await self.starttls()
            elif policy in ("encrypt", "verify"):
                raise DeliveryError(Reply.of(450, "4.7.4", f"TLS is required, but was not "
                                             f"offered by host {self.relay}"), self.relay)
        if credentials is not None:
            await self.authenticate(credentials)

    async def greeting(self) -> Reply:
        greeting = await self._read("greeting", self.settings.greeting_timeout,
                                    "receiving the initial server greeting")
        if greeting.code != 220:
            raise DeliveryError(_soft(Reply.of(greeting.code, greeting.enhanced,
                                               f"host {self.relay} refused to talk to me: "
                                               f"{greeting.text}")), self.relay)
        return greeting

    async def hello(self) -> None:
        s = self.settings
        self._write(self.conn.ehlo())
        reply = await self._read("ehlo", s.command_timeout, "sending EHLO")
        if reply.code == 250:
            return
        if reply.code >= 500 and not self.conn.tls:  # an SMTP-only server: HELO
            self._write(self.conn.helo())
            reply = await self._read("helo", s.command_timeout, "sending HELO")
            if reply.code == 250:
                return
        raise DeliveryError(_soft(Reply(reply.code, reply.enhanced,
                                        (self.said(reply, "EHLO"),))), self.relay)

    async def starttls(self) -> None:
        s = self.settings
        self._write(self.conn.starttls())
        reply = await self._read("starttls", s.command_timeout, "sending STARTTLS")
        if reply.code != 220:
            if self.hop.tls == "may":
                return  # opportunistic: carry on in clear, as Postfix does
            raise DeliveryError(Reply.of(450, "4.7.5", f"TLS is required, but host "
                                         f"{self.relay} refused to start TLS: {reply.text}"),
                                self.relay)
        transport = self.proto.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        server_name = self.target.host if self.hop.tls == "verify" else None
        try:
            new = await loop.start_tls(transport, self.proto, tls_context(self.hop),
                                       server_hostname=server_name or self.target.host,
                                       ssl_handshake_timeout=s.command_timeout)
        except (TimeoutError, ssl.SSLError, ssl.CertificateError, OSError, ConnectionError) as exc:
            transport.abort()
            detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) \
                or str(exc) or exc.__class__.__name__
            raise DeliveryError(Reply.of(450, "4.7.5", f"TLS handshake with {self.relay} "
                                         f"failed: {detail}"), self.relay) from None
        self.proto.transport = new  # type: ignore[assignment]
        self.conn.tls_established()
        await self.hello()

    @property
    def tls_info(self) -> ssl.SSLObject | None:
        transport = self.proto.transport
        return transport.get_extra_info("ssl_object") if transport is not None else None

    async def authenticate(self, creds: Credentials) -> None:
        if not self.conn.tls and not self.hop.allow_plaintext_auth:
            raise DeliveryError(Reply.of(450, "4.7.0", f"refusing to send credentials to "
                                         f"{self.relay} without TLS"), self.relay)
        offered = self.conn.caps.auth
        if not offered:
            raise DeliveryError(Reply.of(450, "4.7.0", f"credentials are configured but "
                                         f"{self.relay} does not offer AUTH"), self.relay)
        s = self.settings
        if "PLAIN" in offered:
            self._write(self.conn.auth_plain(creds.user, creds.password))
            reply = await self._read("auth", s.command_timeout, "authenticating")
        elif "LOGIN" in offered:
            self._write(self.conn.auth_login())
            reply = await self._read("auth", s.command_timeout, "authenticating")
            for answer in (creds.user, creds.password):
                if reply.code != 334:
                    break
                self._write(self.conn.auth_continue(answer))
                reply = await self._read("auth", s.command_timeout, "authenticating")
        else:
            raise DeliveryError(Reply.of(450, "4.7.0", f"no supported AUTH mechanism offered "
                                         f"by {self.relay}: {' '.join(offered)}"), self.relay)
        if reply.code != 235:
            raise DeliveryError(_soft(Reply(reply.code, reply.enhanced,
                                            (f"SASL authentication failed; server {self.relay} "
                                             f"said: {reply.text}",))), self.relay)

    # -- mail ---------------------------------------------------------------
    def mail_params(self, size: int, sender_params: dict[str, str | None]
                    ) -> dict[str, str | None]:
        caps = self.conn.caps
        params: dict[str, str | None] = {}
        if caps.size is not None:
            params["SIZE"] = str(size)
        body = (sender_params.get("BODY") or "").upper()
        if body == "8BITMIME" and caps.eightbitmime:
            params["BODY"] = "8BITMIME"
        if "SMTPUTF8" in sender_params:
            params["SMTPUTF8"] = None
        return params

    async def send(self, sender: str, sender_params: dict[str, str | None],
                   recipients: list[str], data: bytes, *, checked: bool = False) -> Transaction:
        """One transaction; per-recipient results are in the returned :class:`Transaction`.

        ``checked``: ``data`` is known to have no bare CR or LF (it came
        from the spool, which only holds mail that passed that check).
        """
        if self.conn.caps.pipelining:
            attempt = self.start(sender, sender_params, recipients, data, checked=checked)
            await self.envelope(attempt)
        else:
            attempt = await self._stepwise(sender, sender_params, recipients, data, checked)
        return await self.end(attempt)

    def start(self, sender: str, sender_params: dict[str, str | None], recipients: list[str],
              data: bytes, *, checked: bool = False, dotless: bool = False) -> Attempt:
        """Write ``MAIL``, every ``RCPT`` and ``DATA`` at once (RFC 2920; PIPELINING only).

        Nothing is read here, so the caller may still be waiting for the
        previous message's final reply: that reply comes first, then these.
        """
        params = self.mail_params(len(data), sender_params)
        attempt = Attempt(Transaction(list(recipients)), data, checked, dotless)
        try:
            wire = self.conn.transaction(sender, params, recipients)
        except ClientProtocolError as exc:
            raise self._unsendable(exc) from None
        self._write(wire)
        return attempt

    async def envelope(self, attempt: Attempt) -> None:
        """Read the replies to :meth:`start`; after a 354, send the message data."""
        s = self.settings
        tx = attempt.tx
        tx.mail = await self._read("mail", s.command_timeout, "sending MAIL FROM")
        for _ in tx.recipients:
            tx.rcpt.append(await self._read("rcpt", s.command_timeout, "sending RCPT TO"))
        tx.data = await self._read("data", s.command_timeout, "sending DATA")
        self._send_data(attempt)

    async def _stepwise(self, sender: str, sender_params: dict[str, str | None],
                        recipients: list[str], data: bytes, checked: bool) -> Attempt:
        """A server without PIPELINING: one command, one reply."""
        s = self.settings
        params = self.mail_params(len(data), sender_params)
        attempt = Attempt(Transaction(list(recipients)), data, checked)
        tx = attempt.tx
        try:
            self._write(self.conn.mail(sender, params))
            tx.mail = await self._read("mail", s.command_timeout, "sending MAIL FROM")
            if tx.mail.is_positive:
                for rcpt in recipients:
                    self._write(self.conn.rcpt(rcpt))
                    tx.rcpt.append(await self._read("rcpt", s.command_timeout,
                                                    "sending RCPT TO"))
                if tx.accepted:
                    self._write(self.conn.data())
                    tx.data = await self._read("data", s.command_timeout, "sending DATA")
        except ClientProtocolError as exc:
            raise self._unsendable(exc) from None
        self._send_data(attempt)
        return attempt

    def _send_data(self, attempt: Attempt) -> None:
        tx = attempt.tx
        if tx.data is not None and tx.data.code == 354:
            try:
                self._write(self.conn.message(attempt.data if tx.accepted else b"",
                                              checked=attempt.checked, dotless=attempt.dotless))
            except ClientProtocolError as exc:
                raise self._unsendable(exc) from None
            attempt.sent_data = True

    async def end(self, attempt: Attempt, *, reset: bool = True) -> Transaction:
        """The final reply to the message data, if it was sent.

        ``reset=False`` when the next transaction's envelope is already on
        the wire: an ``RSET`` now would cancel that one, not this one.
        """
        tx = attempt.tx
        if attempt.sent_data:
            tx.final = await self._read("end", self.settings.data_timeout,
                                        "sending end of data -- message may be sent more "
                                        "than once")
        if reset and not (tx.final is not None and tx.final.code == 250 and tx.accepted):
            await self.reset()
        self.messages += 1
        self.last_used = time.monotonic()
        return tx

    def _unsendable(self, exc: ClientProtocolError) -> DeliveryError:
        return DeliveryError(Reply.of(554, "5.6.0", f"cannot send message: {exc}"), self.relay)

    async def reset(self) -> None:
        self._write(self.conn.rset())
        reply = await self._read("rset", self.settings.command_timeout, "sending RSET")
        if reply.code != 250:
            self.close()

    def close(self, quit: bool = True) -> None:
        transport = self.proto.transport
        if transport is None or self.proto.closed:
            return
        with contextlib.suppress(Exception):  # a transport aborted mid-handshake
            if quit and not transport.is_closing():
                self._out.append(self.conn.quit())
            self._flush()
        transport.close()


async def open_connection(hop: NextHopConfig, settings: DeliveryConfig, resolver: Resolver,
                          memory: FamilyMemory, helo: str, domain: str,
                          credentials: Credentials | None) -> HopConnection:
    """Connect to the first host of ``hop`` that completes the handshake.

    ``domain`` is the recipient domain, used by the built-in ``direct`` hop.
    Raises :class:`DeliveryError` describing the last failure.
    """
    started = time.monotonic()
    host = hop.host or domain
    try:
        targets = await resolver.targets(host, hop.mx)
    except LookupFailed as exc:
        permanent = exc.permanent and not hop.host  # a configured relay host never bounces
        reply = Reply.of(550 if permanent else 451, "5.4.4" if permanent else "4.4.3", str(exc))
        raise DeliveryError(reply) from None
    last: DeliveryError | None = None
    for target in targets:
        order = memory.order(target.host, target.addresses)
        conn = ClientConnection(helo)
        try:
            result = await connect_staggered(
                order, hop.port, lambda c=conn: ClientProtocol(c),
                timeout=settings.connect_timeout, source=hop.source_address)
        except ConnectFailed as exc:
            for address, _ in exc.errors:
                memory.failed(target.host, address)
            text = "; ".join(f"connect to {target.host}[{a}]:{hop.port}: {e}"
                             for a, e in exc.errors) or f"no address for {target.host}"
            last = DeliveryError(Reply.of(451, "4.4.1", text))
            continue
        for address, _ in result.errors:
            memory.failed(target.host, address)
        memory.succeeded(target.host, result.address)
        proto = result.protocol
        assert isinstance(proto, ClientProtocol)
        hc = HopConnection(hop, settings, target, result.address, proto, helo)
        try:
            await hc.handshake(credentials)
        except DeliveryError as exc:
            hc.close()
            last = exc
            continue
        hc.setup_seconds = time.monotonic() - started
        return hc
    assert last is not None
    raise last
