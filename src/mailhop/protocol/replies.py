"""SMTP replies: one value type for both directions of the engine.

A reply is a three-digit code, an optional RFC 3463 enhanced status code and
text lines.  The server formats them; the client parses them.  Keeping both
in one place means a reply survives a round trip unchanged, which the
property tests rely on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply.  ``lines`` holds the text without code or enhanced status."""

    code: int
    enhanced: str = ""
    lines: tuple[str, ...] = ("",)

    @classmethod
    def of(cls, code: int, enhanced: str, *lines: str) -> Reply:
        return cls(code, enhanced, lines or ("",))

    @property
    def text(self) -> str:
        """Single-line text including the enhanced code, as logs show it."""
        body = " ".join(self.lines)
        return f"{self.code} {self.enhanced} {body}".rstrip() if self.enhanced else (
            f"{self.code} {body}".rstrip()
        )

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def to_bytes(self) -> bytes:
        out = []
        last = len(self.lines) - 1
        prefix = f"{self.enhanced} " if self.enhanced else ""
        for i, line in enumerate(self.lines):
            if not line.isprintable():  # control characters never reach the wire
                line = "".join(ch if ch.isprintable() else "?" for ch in line)
            sep = " " if i == last else "-"
            out.append(f"{self.code}{sep}{prefix}{line}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8", "replace")


def enhanced_of(text: str) -> tuple[str, str]:
    """Split ``"2.0.0 Ok"`` into ``("2.0.0", "Ok")``; no code gives ``("", text)``."""
    head, _, rest = text.partition(" ")
    if _ENHANCED.match(head):
        return head, rest
    return "", text


class ReplyParser:
    """Incremental parser for server replies (used by the client engine).

    Yields complete replies; multi-line replies (``250-``) are joined.
    Raises ``ValueError`` on a line that is not an SMTP reply, because a
    client that guesses at garbage is how response injection works.
    """

    MAX_LINE = 4096
    MAX_LINES = 200

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pending: list[str] = []
        self._code = 0

    def feed(self, data: bytes) -> list[Reply]:
        buf = self._buf
        buf += data
        if b"\n" not in data:
            if len(buf) > self.MAX_LINE:
                raise ValueError("reply line too long")
            return []
        *lines, rest = bytes(buf).split(b"\r\n")
        if len(rest) > self.MAX_LINE:
            raise ValueError("reply line too long")
        self._buf = bytearray(rest)
        replies: list[Reply] = []
        for raw in lines:
            reply = self._line(raw)
            if reply is not None:
                replies.append(reply)
        return replies

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def discard_buffer(self) -> None:
        """Drop unread bytes: after STARTTLS's 220 nothing in clear may be trusted."""
        self._buf.clear()

    def _line(self, raw: bytes) -> Reply | None:
        sep = raw[3:4]
        if len(raw) < 3 or not raw[:3].isdigit() or (sep and sep not in b" -"):
            raise ValueError(f"malformed reply line: {raw[:60]!r}")
        code = int(raw[:3])
        text = raw[4:].decode("utf-8", "replace")
        if not self._pending and sep != b"-":  # the usual one-line reply
            enhanced, first = enhanced_of(text)
            return Reply(code, enhanced, (first,))
        if self._pending and code != self._code:
            raise ValueError("reply code changed inside a multi-line reply")
        self._code = code
        self._pending.append(text)
        if len(self._pending) > self.MAX_LINES:
            raise ValueError("too many reply lines")
        if sep == b"-":
            return None
        lines = self._pending
        self._pending = []
        enhanced, first = enhanced_of(lines[0])
        if enhanced:
            rest = [enhanced_of(line)[1] if line.startswith(enhanced) else line
                    for line in lines[1:]]
            return Reply(code, enhanced, (first, *rest))
        return Reply(code, "", tuple(lines))
