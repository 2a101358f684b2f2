"""Delivery status notifications (RFC 3464) for mail that cannot be delivered.

A bounce is an ordinary message from the null sender ``<>`` to the original
envelope sender (RFC 5321 6.1), queued like any other.  It is assembled as
bytes, not through the ``email`` package: the returned headers are copied
verbatim from the original (re-serialising them is how header injection
bugs happen), and every value we write ourselves is stripped of controls.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from email.utils import formatdate

_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


def _clean(text: str) -> str:
    return _CONTROLS.sub(" ", text)


@dataclass(frozen=True)
class Failure:
    recipient: str
    status: str  # RFC 3463, e.g. 5.1.1
    diagnostic: str  # the remote reply or our own reason
    remote_mta: str = ""  # host name of the server that said it, if any
    action: str = "failed"


def build_dsn(*, reporting_mta: str, queue_id: str, sender: str, arrival: float,
              failures: list[Failure], original: bytes, utf8: bool = False) -> bytes:
    """The DSN message bytes, CRLF line ends throughout."""
    boundary = f"{queue_id}.{secrets.token_hex(6)}/{reporting_mta}"
    now = time.time()
    lines = [
        f"From: MAILER-DAEMON@{reporting_mta} (Mail Delivery System)",
        f"To: <{_clean(sender)}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {formatdate(now, localtime=True)}",
        f"Message-ID: <{queue_id}.{int(now)}.{secrets.token_hex(4)}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "",
    ]
    for f in failures:
        lines.append(f"<{_clean(f.recipient)}>: {_clean(f.diagnostic)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/global-delivery-status" if utf8
        else "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Mailhop-Queue-ID: {queue_id}",
        f"X-Mailhop-Sender: rfc822; {_clean(sender)}",
        f"Arrival-Date: {formatdate(arrival, localtime=True)}",
        "",
    ]
    for f in failures:
        lines += [
            f"Final-Recipient: {'utf-8' if utf8 else 'rfc822'}; {_clean(f.recipient)}",
            f"Action: {f.action}",
            f"Status: {f.status}",
        ]
        if f.remote_mta:
            lines.append(f"Remote-MTA: dns; {_clean(f.remote_mta)}")
        lines.append(f"Diagnostic-Code: smtp; {_clean(f.diagnostic)}")
        lines.append("")
    end = original.find(b"\r\n\r\n")
    headers = original if end < 0 else original[: end + 2]
    head = "\r\n".join(lines).encode("utf-8")
    tail = (f"--{boundary}\r\nContent-Description: Undelivered Message Headers\r\n"
            f"Content-Type: {'message/global-headers' if utf8 else 'text/rfc822-headers'}\r\n"
            f"\r\n").encode()
    return head + b"\r\n" + tail + headers + f"\r\n--{boundary}--\r\n".encode()
