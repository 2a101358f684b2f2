"""The queued message as the rest of mailhop sees it.

The spool stores exactly these fields; delivery reads them back.  Message
bytes are kept as received (plus our ``Received:`` line) because a relay
must not re-serialise mail (RFC 5321 4.5.2, and the Python ``email``
header-injection CVEs in the requirements).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RcptState(enum.StrEnum):
    QUEUED = "queued"
    ACTIVE = "active"
    DEFERRED = "deferred"
    SENT = "sent"
    BOUNCED = "bounced"


#: Pending recipients are queued or deferred.  ``active`` exists only in the
#: scheduler's memory: the spool keeps such recipients as queued/deferred, so a
#: crash mid-delivery simply retries them (at-least-once, never lost).
#: States after which a recipient needs no more work:
FINAL_STATES = (RcptState.SENT, RcptState.BOUNCED)


@dataclass(slots=True)
class Recipient:
    """One envelope recipient; ``idx`` is its position in the message's list."""

    address: str
    params: dict[str, str | None] = field(default_factory=dict)
    state: RcptState = RcptState.QUEUED
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""
    idx: int = 0


@dataclass(slots=True)
class Envelope:
    """Who sent what to whom, and how it reached us."""

    sender: str
    recipients: list[Recipient]
    sender_params: dict[str, str | None] = field(default_factory=dict)
    client_addr: str = ""
    client_name: str = "unknown"
    helo: str = ""
    protocol: str = "ESMTP"
    auth_user: str | None = None
    listener: str = ""
    message_id: str = ""


@dataclass(slots=True)
class QueuedMessage:
    queue_id: str
    arrival: float
    size: int
    envelope: Envelope
    held: bool = False
