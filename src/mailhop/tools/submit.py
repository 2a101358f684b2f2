"""Local submission: ``mailhop sendmail`` and ``mailhop send`` (like ``mail -s``).

The seed sent its test mail with ``mail -s SUBJECT -r FROM TO``; applications
call ``sendmail -t -i``.  Both are here, submitting over SMTP to the local
node with mailhop's own client (so a relay needs no second MTA just to
accept local mail).  Exit codes follow sendmail's sysexits where they
exist: 64 bad usage or input, 69 rejected, 75 try again later.
"""

from __future__ import annotations

import asyncio
import email.header
import email.utils
import re
import socket
from dataclasses import dataclass

from ..config import DeliveryConfig, NextHopConfig
from ..delivery.client import DeliveryError, open_connection
from ..delivery.connect import FamilyMemory
from ..delivery.resolver import Resolver
from ..protocol.address import AddressError, validate_mailbox

EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL = 64, 69, 75


class SubmitError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Submitted:
    queue_id: str
    reply: str
    accepted: list[str]
    rejected: list[str]


def check_address(address: str, what: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    try:
        validate_mailbox(address, utf8=not address.isascii())
    except AddressError as exc:
        raise SubmitError(f"invalid {what} address {address!r}: {exc}", EX_USAGE) from None
    return address


def canonical(data: bytes) -> bytes:
    """Any mix of LF and CRLF line ends to CRLF (local programs write LF)."""
    return re.sub(rb"\r?\n|\r", b"\r\n", data)


def headers_and_body(data: bytes) -> tuple[list[bytes], bytes]:
    data = canonical(data)
    if data.startswith(b"\r\n"):
        return [], data[2:]
    end = data.find(b"\r\n\r\n")
    head, body = (data, b"") if end < 0 else (data[: end + 2], data[end + 4 :])
    lines: list[bytes] = []
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in b" \t" and lines:
            lines[-1] += b"\r\n" + line
        else:
            lines.append(line)
    return lines, body


def header_value(lines: list[bytes], name: bytes) -> list[str]:
    out = []
    for line in lines:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            out.append(value.decode("utf-8", "replace").replace("\r\n", " ").strip())
    return out


def build_sendmail_message(data: bytes, sender: str, full_name: str | None,
                           recipients: list[str], from_headers: bool,
                           dot_ends: bool) -> tuple[bytes, list[str]]:
    """What ``sendmail`` does to its input: -t recipients, missing headers, Bcc removal."""
    if dot_ends:  # without -i a line with a single dot ends the message
        m = re.search(rb"(^|\n)\.\r?\n", data)
        if m is not None:
            data = data[: m.start() + len(m.group(1))]
    lines, body = headers_and_body(data)
    rcpts = list(recipients)
    if from_headers:
        for name in (b"to", b"cc", b"bcc"):
            for value in header_value(lines, name):
                rcpts += [addr for _, addr in email.utils.getaddresses([value]) if addr]
        lines = [ln for ln in lines if ln.partition(b":")[0].strip().lower() != b"bcc"]
    if not rcpts:
        raise SubmitError("no recipients given (name them, or use -t with To:/Cc:/Bcc:)",
                          EX_USAGE)
    rcpts = [check_address(r, "recipient") for r in dict.fromkeys(rcpts)]
    present = {ln.partition(b":")[0].strip().lower() for ln in lines}
    extra = []
    if b"from" not in present:
        shown = f'"{full_name}" <{sender}>' if full_name else sender
        extra.append(f"From: {shown}".encode())
    if b"date" not in present:
        extra.append(f"Date: {email.utils.formatdate(localtime=True)}".encode())
    if b"message-id" not in present:
        extra.append(f"Message-ID: {email.utils.make_msgid(domain=_domain(sender))}".encode())
    head = b"".join(line + b"\r\n" for line in lines + extra)
    return head + b"\r\n" + body, rcpts


def build_mail_message(subject: str, sender: str, recipients: list[str],
                       body: bytes) -> bytes:
    """What ``mail -s`` sends: a plain UTF-8 text message."""
    subject_text = subject if subject.isascii() else email.header.Header(
        subject, "utf-8").encode()
    head = [
        f"From: {sender}", f"To: {', '.join(recipients)}", f"Subject: {subject_text}",
        f"Date: {email.utils.formatdate(localtime=True)}",
        f"Message-ID: {email.utils.make_msgid(domain=_domain(sender))}",
        "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    text = canonical(body)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return "\r\n".join(head).encode() + b"\r\n\r\n" + text


def _domain(sender: str) -> str:
    return sender.rpartition("@")[2] or socket.getfqdn()


def default_sender() -> str:
    import getpass

    return f"{getpass.getuser()}@{socket.getfqdn()}"


async def submit(server: tuple[str, int], sender: str, recipients: list[str],
                 data: bytes, timeout: float = 60.0) -> Submitted:
    """One SMTP transaction to the local node; raises :class:`SubmitError`."""
    host, port = server
    hop = NextHopConfig("submission", host, port, mx=False, tls="none")
    settings = DeliveryConfig(connect_timeout=10, greeting_timeout=timeout,
                              command_timeout=timeout, data_timeout=max(timeout, 600))
    try:
        conn = await open_connection(hop, settings, Resolver(), FamilyMemory(),
                                     socket.getfqdn() or "localhost", "", None)
    except DeliveryError as exc:
        raise SubmitError(f"cannot submit to {host}:{port}: {' '.join(exc.reply.lines)} "
                          "(is the node running?)", EX_TEMPFAIL) from None
    params: dict[str, str | None] = {"BODY": "8BITMIME"} if not data.isascii() else {}
    if not (sender.isascii() and all(r.isascii() for r in recipients)):
        params["SMTPUTF8"] = None
    try:
        tx = await conn.send(sender, params, recipients, data)
    except DeliveryError as exc:
        raise SubmitError(f"submission failed: {exc.reply.text}", EX_TEMPFAIL) from None
    finally:
        conn.close()
    rejected = [r for r in tx.results() if r.status != "sent"]
    if rejected and len(rejected) == len(recipients):
        worst = rejected[0]
        code = EX_TEMPFAIL if worst.status == "deferred" else EX_UNAVAILABLE
        raise SubmitError("; ".join(f"<{r.address}>: {r.reply.text}" for r in rejected), code)
    final = tx.final.text if tx.final else ""
    m = re.search(r"queued as (\S+)", final)
    return Submitted(m.group(1) if m else "", final, tx.accepted,
                     [f"<{r.address}>: {r.reply.text}" for r in rejected])


def run_submit(server: tuple[str, int], sender: str, recipients: list[str],
               data: bytes) -> Submitted:
    return asyncio.run(submit(server, sender, recipients, data))
