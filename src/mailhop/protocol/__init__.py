"""mailhop's sans-IO SMTP engine: bytes in, events and reply bytes out."""

from .events import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    AuthRequest,
    MailFrom,
    MessageReceived,
    RcptTo,
    StartTLS,
)
from .replies import Reply
from .server import ServerConfig, ServerConnection

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "PAUSED",
    "AuthRequest",
    "MailFrom",
    "MessageReceived",
    "RcptTo",
    "Reply",
    "ServerConfig",
    "ServerConnection",
    "StartTLS",
]
