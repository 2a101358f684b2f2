"""Events the server engine hands to its binding.

Only things the binding must act on are events: a policy decision (MAIL,
RCPT, AUTH), a durable commit (a complete message), a transport change
(STARTTLS) or the end of the session.  Everything else (EHLO, NOOP, RSET,
syntax errors, sequencing) the engine answers on its own, so a binding is
small and every binding behaves the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Params = dict[str, str | None]


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: More bytes are needed before anything else can happen.
NEED_DATA = _Sentinel("NEED_DATA")
#: The engine waits for the binding to answer the last event (or finish TLS).
PAUSED = _Sentinel("PAUSED")
#: The session is over; flush :meth:`data_to_send` and close.
CLOSED = _Sentinel("CLOSED")


@dataclass(frozen=True, slots=True)
class MailFrom:
    """``MAIL FROM``; answer with ``accept()`` or ``reject(reply)``."""

    sender: str
    params: Params


@dataclass(frozen=True, slots=True)
class RcptTo:
    """``RCPT TO``; answer with ``accept()`` or ``reject(reply)``."""

    recipient: str
    params: Params


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A complete, validated message (dot-unstuffed, CRLF line ends).

    Answer with ``accept("queued as ID")`` only once it is durable.
    """

    sender: str
    sender_params: Params
    recipients: tuple[tuple[str, Params], ...]
    data: bytes
    dotless: bool = False  # no line begins with ".", so the wire form needs no stuffing


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """Decoded SASL credentials; answer ``accept()`` (235) or ``reject(reply)``."""

    mechanism: str
    username: str
    password: str = field(repr=False)  # never in a repr, so never in a log
    authzid: str = ""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The 220 is queued; flush it, upgrade the transport, call ``tls_established()``."""


Event = MailFrom | RcptTo | MessageReceived | AuthRequest | StartTLS
