"""Hypothesis drives the server engine with split sessions and garbage.

Properties: no exception escapes; every byte the engine writes is a
well-formed SMTP reply line; the same session cut into different chunks
yields the same events and the same replies (TCP may split anywhere).
"""

from __future__ import annotations

import contextlib
import re

from conftest import EngineDriver
from hypothesis import given, settings
from hypothesis import strategies as st

from mailhop.protocol import ServerConfig
from mailhop.protocol.address import (
    _DOT_STRING,
    _QUOTED,
    _SIMPLE,
    MAX_DOMAIN,
    MAX_LOCAL,
    AddressError,
    valid_domain,
    validate_mailbox,
)
from mailhop.protocol.client import dot_stuff

REPLY_LINE = re.compile(rb"^[2-5][0-5]\d[ -][^\r\n]*$")

COMMANDS = [
    b"EHLO client.test\r\n", b"HELO client\r\n", b"MAIL FROM:<a@example.org>\r\n",
    b"MAIL FROM:<> SIZE=100\r\n", b"RCPT TO:<b@example.com>\r\n", b"RCPT TO:<Postmaster>\r\n",
    b"DATA\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n", b"..dot\r\n.\r\n", b"RSET\r\n",
    b"NOOP\r\n", b"VRFY x\r\n", b"HELP\r\n", b"STARTTLS\r\n", b"AUTH PLAIN AHUAc2VjcmV0\r\n",
    b"AUTH LOGIN\r\n", b"dXNlcg==\r\n", b"c2VjcmV0\r\n", b"*\r\n", b"BDAT 1\r\n",
    b"MAIL FROM:<bad\r\n", b"\n.\n", b"\r.\r", b"QUIT\r\n", b"garbage\r\n",
]
# STARTTLS discards what is buffered behind it, so where a chunk ends changes
# what survives it by design; it has its own tests.
SPLITTABLE = [c for c in COMMANDS if c != b"STARTTLS\r\n"]
CONFIGS = [
    ServerConfig(hostname="mx.test"),
    ServerConfig(hostname="mx.test", tls_available=True, auth_mechanisms=("PLAIN", "LOGIN"),
                 allow_plaintext_auth=True, max_recipients=100, max_message_size=200),
]


def run(config: ServerConfig, chunks: list[bytes]) -> tuple[bytes, list[object]]:
    drv = EngineDriver(config)
    for chunk in chunks:
        drv.feed(chunk)
    return bytes(drv.out), drv.events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


def assert_valid_replies(out: bytes) -> None:
    assert out.endswith(b"\r\n")
    for line in out[:-2].split(b"\r\n"):
        assert REPLY_LINE.match(line), line


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SPLITTABLE), min_size=1, max_size=25),
       st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
       st.sampled_from(CONFIGS))
def test_any_split_gives_same_session(commands: list[bytes], cuts: list[int],
                                      config: ServerConfig) -> None:
    data = b"".join(commands)
    whole_out, whole_events = run(config, [data])
    split_out, split_events = run(config, split(data, cuts))
    assert split_out == whole_out
    assert split_events == whole_events
    assert_valid_replies(whole_out)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20), st.sampled_from(CONFIGS))
def test_garbage_never_raises_and_replies_stay_valid(chunks: list[bytes],
                                                     config: ServerConfig) -> None:
    out, _ = run(config, [b"EHLO x\r\n", *chunks])
    assert_valid_replies(out)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(COMMANDS), max_size=25), st.sampled_from(CONFIGS))
def test_command_soup_replies_stay_valid(commands: list[bytes], config: ServerConfig) -> None:
    out, _ = run(config, commands)
    assert_valid_replies(out)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 3000), max_size=20))
def test_message_bytes_round_trip(body: bytes, cuts: list[int]) -> None:
    """Any CRLF-canonical body, dot-stuffed on the wire, is received byte for byte."""
    lines = body.replace(b"\r", b"").replace(b"\x00", b"").split(b"\n")
    canonical = b"".join(line[:900] + b"\r\n" for line in lines)
    stuffed = canonical.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    session = (b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n" + stuffed
               + b".\r\n")
    _, events = run(CONFIGS[0], split(session, cuts))
    received = [e for e in events if type(e).__name__ == "MessageReceived"]
    assert len(received) == 1
    assert received[0].data == canonical  # type: ignore[attr-defined]
    # "dotless" lets delivery skip the stuffing pass: it must never be wrong.
    dotless = received[0].dotless  # type: ignore[attr-defined]
    assert dotless == (not canonical.startswith(b".") and b"\r\n." not in canonical)
    assert dot_stuff(canonical, checked=True, dotless=dotless) == stuffed + b".\r\n"


ADDRESS_CHARS = "ab.-@_+\"[]:\\ \x7fé9" + "x" * 5


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=ADDRESS_CHARS, max_size=80), st.integers(0, 70), st.integers(0, 70))
def test_address_fast_path_agrees_with_the_full_rules(text: str, local: int, label: int) -> None:
    """The one-regex fast path accepts nothing that the label-by-label rules refuse."""
    for address in (text, "l" * local + "@" + "d" * label + ".test", "a@" + text):
        fast = bool(_SIMPLE.fullmatch(address)) and address.index("@") <= MAX_LOCAL \
            and len(address) - address.index("@") <= MAX_DOMAIN + 1
        full = _full_rules(address)
        assert not fast or full, address
        with contextlib.suppress(AddressError):
            validate_mailbox(address)
            assert full, address  # and the public function agrees with the full rules


def _full_rules(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    return bool(at and local and len(local.encode()) <= MAX_LOCAL
                and (_DOT_STRING.match(local) or _QUOTED.match(local))
                and valid_domain(domain) and address.isascii()
                and not any(ord(c) < 32 or ord(c) == 127 for c in address))
