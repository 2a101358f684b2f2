"""The server side of mailhop's sans-IO SMTP engine.

Bytes go in with :meth:`ServerConnection.receive_data`, events come out of
:meth:`ServerConnection.next_event`, reply bytes come out of
:meth:`ServerConnection.data_to_send`.  No sockets, no clocks, no threads:
the same engine runs under asyncio, in the property tests and in the
benchmarks, and a session split into any chunks yields the same replies.

Rules enforced here rather than in bindings (see
``shared/reference/smtp-requirements.md``):

* only ``CRLF`` ends a line, only ``CRLF.CRLF`` ends DATA; a message with a
  bare CR or LF is rejected whole, so it can never be split in two
  (SMTP smuggling, CVE-2023-51764 / CVE-2024-27305);
* bytes pipelined after ``STARTTLS`` are discarded (CVE-2011-0411 /
  CVE-2024-34083); STARTTLS is not offered once TLS is up;
* AUTH is neither offered nor accepted in clear unless configured;
* pipelined commands are answered in order and replies are only released
  when the input is exhausted or the engine waits (RFC 2920 3.2);
* over-long lines are rejected, never truncated or split.
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass

from .address import AddressError, parse_mail_arg, parse_rcpt_arg
from .events import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    AuthRequest,
    Event,
    MailFrom,
    MessageReceived,
    Params,
    RcptTo,
    StartTLS,
    _Sentinel,
)
from .replies import Reply

MAX_COMMAND = 512  # RFC 5321 4.5.3.1.4
EXTENSION_ALLOWANCE = 512  # SIZE, BODY, SMTPUTF8, AUTH= ... on MAIL/RCPT
MAX_AUTH_LINE = 12288  # RFC 4954 4
MAX_TEXT_LINE = 998  # RFC 5321 4.5.3.1.6, without CRLF

_NOT_IMPLEMENTED = frozenset({b"EXPN", b"TURN", b"ETRN", b"BDAT", b"ATRN", b"SEND", b"SOML",
                              b"SAML", b"VERB"})
_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "AUTH"})

R_OK = Reply.of(250, "2.0.0", "Ok")
R_SENDER_OK = Reply.of(250, "2.1.0", "Ok")
R_RCPT_OK = Reply.of(250, "2.1.5", "Ok")
R_AUTH_OK = Reply.of(235, "2.7.0", "Authentication successful")
R_AUTH_FAILED = Reply.of(535, "5.7.8", "Error: authentication failed")
R_DATA_GO = Reply.of(354, "", "End data with <CR><LF>.<CR><LF>")
R_BYE = Reply.of(221, "2.0.0", "Bye")
R_TOO_MANY_ERRORS = Reply.of(421, "4.7.0", "Error: too many errors")
R_LINE_TOO_LONG = Reply.of(500, "5.5.2", "Error: line too long")
R_BARE_NEWLINE = Reply.of(500, "5.5.2", "Error: bare <CR> or <LF> received")
R_UNRECOGNIZED = Reply.of(500, "5.5.2", "Error: command not recognized")
R_NOT_IMPLEMENTED = Reply.of(502, "5.5.1", "Error: command not implemented")
R_NEED_HELO = Reply.of(503, "5.5.1", "Error: send HELO/EHLO first")
R_NEED_MAIL = Reply.of(503, "5.5.1", "Error: need MAIL command")
R_NEED_RCPT = Reply.of(503, "5.5.1", "Error: need RCPT command")
R_NESTED_MAIL = Reply.of(503, "5.5.1", "Error: nested MAIL command")
R_NO_VALID_RCPT = Reply.of(554, "5.5.1", "Error: no valid recipients")
R_TOO_MANY_RCPT = Reply.of(452, "4.5.3", "Error: too many recipients")
R_TOO_BIG = Reply.of(552, "5.3.4", "Error: message size exceeds fixed maximum message size")
R_BAD_NEWLINE_DATA = Reply.of(550, "5.6.0", "Error: message contains bare <CR> or <LF>")
R_NUL_DATA = Reply.of(550, "5.6.0", "Error: message contains NUL characters")
R_LONG_LINE_DATA = Reply.of(550, "5.6.0", "Error: message line longer than 998 characters")
R_TLS_GO = Reply.of(220, "2.0.0", "Ready to start TLS")
R_TLS_REQUIRED = Reply.of(530, "5.7.0", "Must issue a STARTTLS command first")
R_AUTH_NEEDS_TLS = Reply.of(538, "5.7.11", "Encryption required for requested authentication "
                            "mechanism")
R_AUTH_CANCELLED = Reply.of(501, "5.0.0", "Authentication cancelled")
R_BAD_BASE64 = Reply.of(501, "5.5.2", "Error: invalid base64 data")


_ENCODED: dict[Reply, bytes] = {}


def _encoded(reply: Reply) -> bytes:
    """Reply bytes, cached for the fixed replies that make up most of a session."""
    data = _ENCODED.get(reply)
    if data is None:
        data = reply.to_bytes()
        if len(_ENCODED) < 512:
            _ENCODED[reply] = data
    return data


class State(enum.Enum):
    COMMAND = "command"
    DATA = "data"
    AUTH = "auth"  # waiting for a SASL continuation line
    TLS = "tls"  # 220 sent, waiting for the binding's handshake
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Per-listener settings the engine needs; shared by all its sessions."""

    hostname: str = "localhost"
    max_message_size: int = 10_240_000
    max_recipients: int = 1000
    tls_available: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    allow_plaintext_auth: bool = False
    require_tls: bool = False
    max_errors: int = 20
    software: str = "mailhop"


class ServerConnection:
    """One SMTP session, as a state machine over bytes."""

    __slots__ = (
        "_auth_mech",
        "_auth_step",
        "_auth_user",
        "_buf",
        "_cfg",
        "_discarding",
        "_dot_lines",
        "_errors",
        "_out",
        "_pending",
        "_rcpt_attempts",
        "_scan_from",
        "_too_big",
        "authenticated",
        "esmtp",
        "helo",
        "recipients",
        "sender",
        "sender_params",
        "state",
        "tls",
    )

    def __init__(self, config: ServerConfig, *, tls: bool = False) -> None:
        self._cfg = config
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._pending: Event | None = None
        self._errors = 0
        self._discarding = False
        self._scan_from = 0
        self._too_big = False
        self._dot_lines = False
        self._auth_mech = ""
        self._auth_step = 0
        self._auth_user = ""
        self._rcpt_attempts = 0
        self.state = State.COMMAND
        self.tls = tls
        self.helo: str | None = None
        self.esmtp = False
        self.authenticated: str | None = None
        self.sender: str | None = None
        self.sender_params: Params = {}
        self.recipients: list[tuple[str, Params]] = []

    # -- output -----------------------------------------------------------
    def greet(self) -> None:
        self._out.append(Reply.of(220, "", f"{self._cfg.hostname} ESMTP {self._cfg.software}")
                         .to_bytes())

    def refuse(self, reply: Reply) -> None:
        """Send ``reply`` (usually 421) and end the session."""
        self._out.append(reply.to_bytes())
        self.state = State.CLOSED

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _reply(self, reply: Reply) -> None:
        self._out.append(_encoded(reply))
        if reply.code >= 400:
            self._errors += 1
            if self._errors >= self._cfg.max_errors and self.state is not State.CLOSED:
                self._out.append(R_TOO_MANY_ERRORS.to_bytes())
                self.state = State.CLOSED

    # -- input ------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self.state is State.TLS or self.state is State.CLOSED:
            # Plaintext after STARTTLS is an injection attempt; after close, noise.
            return
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_event(self) -> Event | _Sentinel:
        while True:
            if self.state is State.CLOSED:
                return CLOSED
            if self._pending is not None or self.state is State.TLS:
                return PAUSED
            if self.state is State.DATA:
                event = self._scan_data()
                if event is None:
                    return NEED_DATA
                if isinstance(event, MessageReceived):
                    self._pending = event
                    return event
                continue
            line = self._next_line()
            if line is None:
                return NEED_DATA
            auth = self.state is State.AUTH
            event = self._auth_continue(line) if auth else self._command(line)
            if event is not None:
                self._pending = event if not isinstance(event, StartTLS) else None
                return event

    # -- decisions --------------------------------------------------------
    def accept(self, text: str | None = None) -> None:
        """Accept the pending event; ``text`` replaces the default reply text."""
        event = self._take_pending()
        if isinstance(event, RcptTo):
            self.recipients.append((event.recipient, event.params))
            self._reply(Reply.of(250, "2.1.5", text) if text else R_RCPT_OK)
        elif isinstance(event, MailFrom):
            self.sender, self.sender_params = event.sender, event.params
            self._reply(Reply.of(250, "2.1.0", text) if text else R_SENDER_OK)
        elif isinstance(event, AuthRequest):
            self.authenticated = event.username
            self._reply(Reply.of(235, "2.7.0", text or "Authentication successful"))
        else:
            self._reply(Reply.of(250, "2.0.0", text or "Ok"))
            self._reset_transaction()

    def reject(self, reply: Reply) -> None:
        """Refuse the pending event with ``reply`` (4xx or 5xx)."""
        if reply.code < 400:
            raise ValueError("reject() needs a 4xx or 5xx reply")
        event = self._take_pending()
        if isinstance(event, MessageReceived):
            self._reset_transaction()
        self._reply(reply)

    def _take_pending(self) -> Event:
        event = self._pending
        if event is None:
            raise RuntimeError("no event is waiting for a decision")
        self._pending = None
        return event

    def tls_established(self) -> None:
        """RFC 3207 4.2: forget everything learnt before the handshake."""
        self.tls = True
        self.helo = None
        self.esmtp = False
        self.authenticated = None
        self._reset_transaction()
        self._buf.clear()
        self.state = State.COMMAND

    # -- line handling ----------------------------------------------------
    def _next_line(self) -> bytes | None:
        buf = self._buf
        end = buf.find(b"\r\n")
        if self._discarding:
            if end < 0:
                del buf[: max(0, len(buf) - 1)]  # keep a possible trailing CR
                return None
            del buf[: end + 2]
            self._discarding = False
            end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) > MAX_AUTH_LINE:
                self._reply(R_LINE_TOO_LONG)
                self._discarding = True
                del buf[: len(buf) - 1]
            return None
        line = bytes(buf[:end])
        del buf[: end + 2]
        return line

    def _command(self, line: bytes) -> Event | None:
        if b"\n" in line or b"\r" in line:
            self._reply(R_BARE_NEWLINE)
            return None
        if b"\x00" in line:
            self._reply(R_UNRECOGNIZED)
            return None
        verb = line[:4].upper()
        if len(line) > 4 and line[4:5] not in (b" ", b":"):
            verb = line.split(b" ", 1)[0].upper()
        limit = MAX_AUTH_LINE if verb == b"AUTH" else (
            MAX_COMMAND + EXTENSION_ALLOWANCE if verb in (b"MAIL", b"RCPT") else MAX_COMMAND)
        if len(line) + 2 > limit:
            self._reply(R_LINE_TOO_LONG)
            return None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(Reply.of(500, "5.5.2", "Error: invalid characters in command"))
            return None
        arg = text[len(verb):]
        if arg and not arg.startswith(" "):
            self._reply(R_UNRECOGNIZED)
            return None
        arg = arg[1:] if arg else ""
        handler = _HANDLERS.get(verb)
        if handler is None:
            self._reply(R_NOT_IMPLEMENTED if verb in _NOT_IMPLEMENTED else R_UNRECOGNIZED)
            return None
        return handler(self, arg)

    # -- commands ---------------------------------------------------------
    def _ehlo(self, arg: str) -> None:
        self._hello(arg, extended=True)

    def _helo(self, arg: str) -> None:
        self._hello(arg, extended=False)

    def _hello(self, arg: str, extended: bool) -> None:
        name = arg.strip(" ")
        if not name or " " in name or not name.isprintable():
            self._reply(Reply.of(501, "5.5.4", f"Syntax: {'EHLO' if extended else 'HELO'} "
                                 "hostname"))
            return
        self._reset_transaction()
        self.helo = name
        self.esmtp = extended
        if not extended:
            self._reply(Reply.of(250, "", self._cfg.hostname))
            return
        cfg = self._cfg
        lines = [cfg.hostname, "PIPELINING", f"SIZE {cfg.max_message_size}"]
        if cfg.tls_available and not self.tls:
            lines.append("STARTTLS")
        if cfg.auth_mechanisms and self.authenticated is None and (
            self.tls or cfg.allow_plaintext_auth
        ):
            lines.append("AUTH " + " ".join(cfg.auth_mechanisms))
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
        self._reply(Reply(250, "", tuple(lines)))

    def _mail(self, arg: str) -> Event | None:
        if self.helo is None:
            self._reply(R_NEED_HELO)
            return None
        if self.sender is not None:
            self._reply(R_NESTED_MAIL)
            return None
        if self._cfg.require_tls and not self.tls:
            self._reply(R_TLS_REQUIRED)
            return None
        if arg[:5].upper() != "FROM:":
            self._reply(Reply.of(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
            return None
        try:
            sender, params = parse_mail_arg(arg[5:])
        except AddressError as exc:
            code = "5.1.3" if "too long" in str(exc) else "5.1.7"
            self._reply(Reply.of(501, code, f"Bad sender address syntax ({exc})"))
            return None
        problem = self._check_mail_params(params)
        if problem is not None:
            self._reply(problem)
            return None
        return MailFrom(sender, params)

    def _check_mail_params(self, params: Params) -> Reply | None:
        if params and not self.esmtp:
            return Reply.of(555, "5.5.4", "Error: parameters need EHLO")
        for key, value in params.items():
            if key not in _MAIL_PARAMS:
                return Reply.of(555, "5.5.4", f"Unsupported option: {key}")
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return Reply.of(501, "5.5.4", "Bad SIZE parameter")
                if int(value) > self._cfg.max_message_size:
                    return R_TOO_BIG
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return Reply.of(501, "5.5.4", "Bad BODY parameter")
            elif key == "SMTPUTF8":
                if value is not None:
                    return Reply.of(501, "5.5.4", "SMTPUTF8 takes no value")
            elif key == "AUTH" and value is None:
                return Reply.of(501, "5.5.4", "Bad AUTH parameter")
        return None

    def _rcpt(self, arg: str) -> Event | None:
        if self.sender is None:
            self._reply(R_NEED_MAIL)
            return None
        if arg[:3].upper() != "TO:":
            self._reply(Reply.of(501, "5.5.4", "Syntax: RCPT TO:<address>"))
            return None
        self._rcpt_attempts += 1
        if len(self.recipients) >= self._cfg.max_recipients:
            self._reply(R_TOO_MANY_RCPT)
            return None
        try:
            rcpt, params = parse_rcpt_arg(arg[3:], utf8="SMTPUTF8" in self.sender_params)
        except AddressError as exc:
            self._reply(Reply.of(501, "5.1.3", f"Bad recipient address syntax ({exc})"))
            return None
        if params:
            self._reply(Reply.of(555, "5.5.4", f"Unsupported option: {next(iter(params))}"))
            return None
        return RcptTo(rcpt, params)

    def _data(self, arg: str) -> None:
        if arg:
            self._reply(Reply.of(501, "5.5.4", "Syntax: DATA"))
        elif self.sender is None:
            self._reply(R_NEED_MAIL)
        elif not self.recipients:
            self._reply(R_NO_VALID_RCPT if self._rcpt_attempts else R_NEED_RCPT)
        else:
            self._reply(R_DATA_GO)
            self.state = State.DATA
            self._buf[0:0] = b"\r\n"  # lets an empty message end at offset 0
            self._scan_from = 0
            self._too_big = False
            self._dot_lines = False

    def _rset(self, arg: str) -> None:
        if arg:
            self._reply(Reply.of(501, "5.5.4", "Syntax: RSET"))
            return
        self._reset_transaction()
        self._reply(R_OK)

    def _noop(self, arg: str) -> None:
        self._reply(R_OK)

    def _quit(self, arg: str) -> None:
        self._out.append(R_BYE.to_bytes())
        self.state = State.CLOSED

    def _vrfy(self, arg: str) -> None:
        if not arg.strip():
            self._reply(Reply.of(501, "5.5.4", "Syntax: VRFY address"))
            return
        self._reply(Reply.of(252, "2.0.0", "Cannot VRFY user, but will accept message and "
                             "attempt delivery"))

    def _help(self, arg: str) -> None:
        self._reply(Reply.of(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT "
                             "VRFY HELP STARTTLS AUTH"))

    def _starttls(self, arg: str) -> Event | None:
        if arg:
            self._reply(Reply.of(501, "5.5.4", "Syntax: STARTTLS"))
            return None
        if self.tls:
            self._reply(Reply.of(554, "5.5.1", "Error: TLS already active"))
            return None
        if not self._cfg.tls_available:
            self._reply(R_NOT_IMPLEMENTED)
            return None
        self._out.append(R_TLS_GO.to_bytes())
        self._buf.clear()  # CVE-2011-0411: nothing sent in clear survives the upgrade
        self.state = State.TLS
        return StartTLS()

    def _auth(self, arg: str) -> Event | None:
        cfg = self._cfg
        if not cfg.auth_mechanisms:
            self._reply(Reply.of(503, "5.5.1", "Error: authentication not enabled"))
            return None
        if self.helo is None or not self.esmtp:
            self._reply(Reply.of(503, "5.5.1", "Error: send EHLO first"))
            return None
        if self.authenticated is not None:
            self._reply(Reply.of(503, "5.5.1", "Error: already authenticated"))
            return None
        if self.sender is not None:
            self._reply(Reply.of(503, "5.5.1", "Error: AUTH not allowed in a mail transaction"))
            return None
        if not self.tls and not cfg.allow_plaintext_auth:
            self._reply(R_AUTH_NEEDS_TLS)
            return None
        mech, _, initial = arg.strip(" ").partition(" ")
        mech = mech.upper()
        if mech not in cfg.auth_mechanisms:
            self._reply(Reply.of(504, "5.5.4", "Error: unsupported authentication mechanism"))
            return None
        self._auth_mech, self._auth_step, self._auth_user = mech, 0, ""
        if mech == "PLAIN":
            if initial:
                return self._auth_plain("" if initial == "=" else initial)
            self._prompt("")
        else:  # LOGIN
            if initial:
                return self._auth_login(initial)
            self._prompt("Username:")
        return None

    def _prompt(self, challenge: str) -> None:
        self.state = State.AUTH
        encoded = base64.b64encode(challenge.encode()).decode()
        self._out.append(f"334 {encoded}\r\n".encode())

    def _auth_continue(self, line: bytes) -> Event | None:
        self.state = State.COMMAND
        if len(line) + 2 > MAX_AUTH_LINE:
            self._reply(R_LINE_TOO_LONG)
            return None
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            self._reply(R_AUTH_CANCELLED)
            return None
        if self._auth_mech == "PLAIN":
            return self._auth_plain(text)
        return self._auth_login(text)

    def _b64(self, text: str) -> str | None:
        try:
            raw = base64.b64decode(text, validate=True)
            return raw.decode("utf-8")
        except (binascii.Error, ValueError):
            self._reply(R_BAD_BASE64)
            return None

    def _auth_plain(self, text: str) -> Event | None:
        decoded = self._b64(text)
        if decoded is None:
            return None
        parts = decoded.split("\x00")
        if len(parts) != 3 or not parts[1]:
            self._reply(Reply.of(501, "5.5.2", "Error: malformed PLAIN response"))
            return None
        return AuthRequest("PLAIN", parts[1], parts[2], parts[0])

    def _auth_login(self, text: str) -> Event | None:
        decoded = self._b64(text)
        if decoded is None:
            return None
        if self._auth_step == 0:
            self._auth_user, self._auth_step = decoded, 1
            self._prompt("Password:")
            return None
        user, self._auth_user = self._auth_user, ""
        return AuthRequest("LOGIN", user, decoded)

    # -- DATA -------------------------------------------------------------
    def _scan_data(self) -> MessageReceived | bool | None:
        """Find the end of the data; note on the way whether any line begins with a dot.

        Looking for ``CRLF .`` instead of ``CRLF . CRLF`` costs the same pass
        (the search stops at every CRLF either way) and tells whether the
        message needs unstuffing at all, and later stuffing again.
        """
        buf = self._buf
        pos = self._scan_from
        while True:
            pos = buf.find(b"\r\n.", pos)
            if pos < 0 or pos + 5 > len(buf):
                if pos < 0:
                    pos = max(0, len(buf) - 2)  # a CRLF . may straddle two reads
                if len(buf) > self._cfg.max_message_size + 64 * 1024:
                    # Too big: stop storing, keep scanning for the end marker.
                    self._too_big = True
                    del buf[: pos]
                    pos = 0
                self._scan_from = pos
                return None
            if buf[pos + 3 : pos + 5] == b"\r\n":
                break
            self._dot_lines = True
            pos += 3
        raw = bytes(buf[: pos + 2])
        del buf[: pos + 5]
        self.state = State.COMMAND
        problem = R_TOO_BIG if self._too_big else _check_data(raw)
        if problem is None:
            data = (raw.replace(b"\r\n.", b"\r\n") if self._dot_lines else raw)[2:]
            if len(data) > self._cfg.max_message_size:
                problem = R_TOO_BIG
        if problem is not None:
            self._reset_transaction()
            self._reply(problem)
            return True
        return MessageReceived(self.sender or "", self.sender_params, tuple(self.recipients),
                               data, not self._dot_lines)

    def _reset_transaction(self) -> None:
        self.sender = None
        self.sender_params = {}
        self.recipients = []
        self._rcpt_attempts = 0


def bare_newline(lines: list[bytes]) -> bool:
    """Is there a CR or LF outside a CRLF pair?  ``lines`` is the text split on CRLF.

    The one rule for both directions (the server refuses such mail, the
    client will not send it); joined, the pieces answer it at ``memchr`` speed.
    """
    rest = b"".join(lines)
    return b"\r" in rest or b"\n" in rest


def _check_data(raw: bytes) -> Reply | None:
    """Bare CR or LF, NUL, over-long lines in dot-stuffed ``raw`` (which starts with CRLF).

    Why one ``split``: on 100 KiB of text, every ``count``/``find`` of a
    multi-byte pattern costs a full byte-by-byte pass (~80 us each), while
    ``in`` on a single byte is ``memchr``.  Splitting on CRLF once answers
    the newline question (:func:`bare_newline`); the same pieces give the
    longest line.
    """
    lines = raw.split(b"\r\n")
    if bare_newline(lines):
        return R_BAD_NEWLINE_DATA
    if b"\x00" in raw:
        return R_NUL_DATA
    if len(raw) > MAX_TEXT_LINE and max(map(len, lines)) > MAX_TEXT_LINE:
        # A dot-stuffed line is one longer on the wire than in the message.
        longest = max(len(line) - (line[:1] == b".") for line in lines)
        if longest > MAX_TEXT_LINE:
            return R_LONG_LINE_DATA
    return None


_HANDLERS = {
    b"EHLO": ServerConnection._ehlo,
    b"HELO": ServerConnection._helo,
    b"MAIL": ServerConnection._mail,
    b"RCPT": ServerConnection._rcpt,
    b"DATA": ServerConnection._data,
    b"RSET": ServerConnection._rset,
    b"NOOP": ServerConnection._noop,
    b"QUIT": ServerConnection._quit,
    b"VRFY": ServerConnection._vrfy,
    b"HELP": ServerConnection._help,
    b"STARTTLS": ServerConnection._starttls,
    b"AUTH": ServerConnection._auth,
}
