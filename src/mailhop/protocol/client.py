"""The client side of mailhop's sans-IO SMTP engine.

The client engine builds command bytes, pairs each server reply with the
command it answers (pipelined commands get their replies in order, RFC 2920
3.2) and interprets a whole transaction into one result per recipient.  It
never touches a socket; :mod:`mailhop.delivery.client` binds it to asyncio.

Safety rules from the requirements that live here:

* envelope values with CR, LF or NUL are refused before they can become
  commands (aiosmtplib GHSA-v3q9-hj7j-63hq);
* message data is dot-stuffed and must already be CRLF-canonical: a bare CR
  or LF is refused, so our output can never end DATA early (SMTP smuggling,
  RUSTSEC-2026-0561 is the client-side variant);
* after STARTTLS's 220 any bytes buffered in clear are discarded (response
  injection, nodemailer PR #1835).
"""

from __future__ import annotations

import base64
import re
from collections import deque
from dataclasses import dataclass, field

from .replies import Reply, ReplyParser
from .server import bare_newline

_UNSAFE = re.compile(r"[\r\n\x00]")


class ClientProtocolError(Exception):
    """The server said something that is not SMTP, or we were asked to send garbage."""


@dataclass
class Capabilities:
    """What the server's EHLO reply offered."""

    esmtp: bool = False
    pipelining: bool = False
    starttls: bool = False
    smtputf8: bool = False
    eightbitmime: bool = False
    size: int | None = None  # None: no SIZE; 0: SIZE without a limit
    auth: tuple[str, ...] = ()
    enhanced: bool = False
    names: tuple[str, ...] = ()

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Capabilities:
        caps = cls(esmtp=True)
        names = []
        for line in reply.lines[1:]:
            keyword, _, rest = line.strip().partition(" ")
            keyword = keyword.upper()
            names.append(keyword)
            if keyword == "PIPELINING":
                caps.pipelining = True
            elif keyword == "STARTTLS":
                caps.starttls = True
            elif keyword == "SMTPUTF8":
                caps.smtputf8 = True
            elif keyword == "8BITMIME":
                caps.eightbitmime = True
            elif keyword == "ENHANCEDSTATUSCODES":
                caps.enhanced = True
            elif keyword == "SIZE":
                caps.size = int(rest) if rest.strip().isdigit() else 0
            elif keyword == "AUTH":
                caps.auth = tuple(m.upper() for m in rest.split())
        caps.names = tuple(names)
        return caps


@dataclass
class RecipientResult:
    """What happened to one recipient in one transaction."""

    address: str
    reply: Reply
    stage: str  # the command the reply answered: MAIL, RCPT, DATA or END-OF-DATA

    @property
    def status(self) -> str:
        if self.reply.is_positive:
            return "sent"
        return "deferred" if self.reply.is_transient else "bounced"

    @property
    def dsn(self) -> str:
        """RFC 3463 status: the server's, or one derived from its reply code."""
        if self.reply.enhanced:
            return self.reply.enhanced
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.reply.code // 100, "4.0.0")


@dataclass
class Transaction:
    """Collects the replies to one (possibly pipelined) mail transaction."""

    recipients: list[str]
    mail: Reply | None = None
    rcpt: list[Reply] = field(default_factory=list)
    data: Reply | None = None
    final: Reply | None = None

    @property
    def accepted(self) -> list[str]:
        return [r for r, reply in zip(self.recipients, self.rcpt, strict=False)
                if reply.is_positive]

    def results(self) -> list[RecipientResult]:
        """One result per recipient; the earliest failing stage decides."""
        out = []
        for i, rcpt in enumerate(self.recipients):
            if self.mail is not None and not self.mail.is_positive:
                out.append(RecipientResult(rcpt, self.mail, "MAIL"))
            elif i < len(self.rcpt) and not self.rcpt[i].is_positive:
                out.append(RecipientResult(rcpt, self.rcpt[i], "RCPT"))
            elif self.data is not None and self.data.code != 354:
                out.append(RecipientResult(rcpt, self.data, "DATA"))
            elif self.final is not None:
                out.append(RecipientResult(rcpt, self.final, "END-OF-DATA"))
            else:
                out.append(RecipientResult(
                    rcpt, Reply.of(451, "4.4.2", "lost connection with server"), "DATA"))
        return out


def check_envelope(value: str) -> str:
    if _UNSAFE.search(value):
        raise ClientProtocolError(f"refusing CR/LF/NUL in envelope value {value[:40]!r}")
    return value


def encode_params(params: dict[str, str | None]) -> str:
    parts = []
    for key, value in params.items():
        check_envelope(key)
        if value is not None:
            check_envelope(value)
        parts.append(key if value is None else f"{key}={value}")
    return (" " + " ".join(parts)) if parts else ""


def dot_stuff(data: bytes, *, checked: bool = False, dotless: bool = False) -> bytes:
    """Wire form of message data: dot-stuffed and terminated with ``.CRLF``.

    ``checked`` skips the bare CR/LF test for data that passed it on the
    way in (everything in the spool did): on a large message that test is
    a full pass over the bytes.  ``dotless`` (the receiving engine
    found no line beginning with a dot) skips the stuffing pass too.
    """
    if not checked and bare_newline(data.split(b"\r\n")):
        raise ClientProtocolError("message contains bare CR or LF; refusing to send it")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    stuffed = data if dotless else data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


class ClientConnection:
    """Pairs replies with the commands sent; knows what the server offered.

    Usage: feed every received chunk to :meth:`receive_data`; it returns
    ``(tag, reply)`` pairs where ``tag`` names the command the reply answers
    (``"greeting"`` for the banner).  Commands are built with the ``*``
    methods, which return bytes to write and register the replies they wait for.
    """

    def __init__(self, local_name: str) -> None:
        self.local_name = check_envelope(local_name)
        self._parser = ReplyParser()
        self._expect: deque[str] = deque(["greeting"])
        self.caps = Capabilities()
        self.tls = False

    @property
    def waiting(self) -> int:
        return len(self._expect)

    def receive_data(self, data: bytes) -> list[tuple[str, Reply]]:
        try:
            replies = self._parser.feed(data)
        except ValueError as exc:
            raise ClientProtocolError(str(exc)) from None
        out = []
        for reply in replies:
            if not self._expect:
                raise ClientProtocolError(f"unexpected reply from server: {reply.text[:80]}")
            tag = self._expect.popleft()
            if tag == "ehlo" and reply.code == 250:
                self.caps = Capabilities.from_ehlo(reply)
            elif tag == "starttls" and reply.code == 220:
                # Anything behind the 220 came in clear: never trust it (RFC 3207 6).
                if self._parser.buffered:
                    raise ClientProtocolError("server sent data after 220 to STARTTLS "
                                              "(response injection?)")
                self._parser.discard_buffer()
            out.append((tag, reply))
        return out

    def _command(self, tag: str, line: str) -> bytes:
        self._expect.append(tag)
        return line.encode("utf-8") + b"\r\n"

    def ehlo(self) -> bytes:
        return self._command("ehlo", f"EHLO {self.local_name}")

    def helo(self) -> bytes:
        self.caps = Capabilities()
        return self._command("helo", f"HELO {self.local_name}")

    def starttls(self) -> bytes:
        return self._command("starttls", "STARTTLS")

    def tls_established(self) -> None:
        """RFC 3207 4.2: forget what the server said in clear; EHLO again."""
        self.tls = True
        self.caps = Capabilities()
        self._parser.discard_buffer()

    def auth_plain(self, user: str, password: str) -> bytes:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self._command("auth", f"AUTH PLAIN {token}")

    def auth_login(self) -> bytes:
        return self._command("auth", "AUTH LOGIN")

    def auth_continue(self, text: str) -> bytes:
        return self._command("auth", base64.b64encode(text.encode()).decode())

    def mail(self, sender: str, params: dict[str, str | None]) -> bytes:
        check_envelope(sender)
        return self._command("mail", f"MAIL FROM:<{sender}>{encode_params(params)}")

    def rcpt(self, recipient: str) -> bytes:
        return self._command("rcpt", f"RCPT TO:<{check_envelope(recipient)}>")

    def data(self) -> bytes:
        return self._command("data", "DATA")

    def transaction(self, sender: str, params: dict[str, str | None],
                    recipients: list[str]) -> bytes:
        """``MAIL``, every ``RCPT`` and ``DATA`` as one write (RFC 2920 pipelining).

        All or nothing: if one command cannot be built (an unsafe address),
        none stays registered, so replies and commands keep pairing up.
        """
        mark = len(self._expect)
        try:
            return self.mail(sender, params) + b"".join(self.rcpt(r) for r in recipients) + \
                self.data()
        except ClientProtocolError:
            while len(self._expect) > mark:
                self._expect.pop()
            raise

    def message(self, data: bytes, *, checked: bool = False, dotless: bool = False) -> bytes:
        wire = dot_stuff(data, checked=checked, dotless=dotless)  # may refuse: register after
        self._expect.append("end")
        return wire

    def rset(self) -> bytes:
        return self._command("rset", "RSET")

    def noop(self) -> bytes:
        return self._command("noop", "NOOP")

    def quit(self) -> bytes:
        return self._command("quit", "QUIT")
