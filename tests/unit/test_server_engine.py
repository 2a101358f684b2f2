"""The sans-IO server engine, driven without sockets: codes, limits, attacks."""

from __future__ import annotations

import base64

import pytest
from conftest import EngineDriver

from mailhop.protocol import Reply, ServerConfig
from mailhop.protocol.events import AuthRequest, MailFrom, RcptTo, StartTLS

HELLO = b"EHLO client.test\r\n"
TX = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"


def tls_cfg(**kw) -> ServerConfig:
    return ServerConfig(hostname="mx.test", tls_available=True,
                        auth_mechanisms=("PLAIN", "LOGIN"), **kw)


def test_greeting_and_ehlo_capabilities(engine: EngineDriver) -> None:
    assert engine.out.startswith(b"220 mx.test ESMTP")
    reply = engine.feed(HELLO).decode()
    lines = reply.split("\r\n")
    assert lines[0] == "250-mx.test"
    for cap in ("PIPELINING", "SIZE 10240000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"):
        assert any(line[4:] == cap for line in lines), cap
    assert "CHUNKING" not in reply and "DSN" not in reply  # never advertise what we lack


def test_full_transaction_pipelined(engine: EngineDriver) -> None:
    codes = engine.codes(HELLO + TX)
    assert codes == ["250", "250 2.1.0", "250 2.1.5", "354"]
    assert engine.codes(b"Subject: t\r\n\r\nhello\r\n.\r\nQUIT\r\n") == ["250 2.0.0", "221 2.0.0"]
    msg = engine.messages[0]
    assert msg.sender == "a@example.org"
    assert msg.recipients == (("b@example.com", {}),)
    assert msg.data == b"Subject: t\r\n\r\nhello\r\n"


def test_dot_unstuffing_and_empty_message(engine: EngineDriver) -> None:
    engine.feed(HELLO + TX)
    engine.feed(b"..leading dot\r\n...\r\n.\r\n")
    assert engine.messages[0].data == b".leading dot\r\n..\r\n"
    engine.feed(TX + b".\r\n")
    assert engine.messages[1].data == b""


@pytest.mark.parametrize(("commands", "expected"), [
    (b"MAIL FROM:<a@b.c>\r\n", ["503 5.5.1"]),  # before EHLO
    (HELLO + b"RCPT TO:<a@b.c>\r\n", ["250", "503 5.5.1"]),  # RCPT before MAIL
    (HELLO + b"DATA\r\n", ["250", "503 5.5.1"]),
    (HELLO + b"MAIL FROM:<a@b.c>\r\nDATA\r\n", ["250", "250 2.1.0", "503 5.5.1"]),
    (HELLO + b"MAIL FROM:<a@b.c>\r\nMAIL FROM:<a@b.c>\r\n", ["250", "250 2.1.0", "503 5.5.1"]),
    (b"FOO\r\n", ["500 5.5.2"]),
    (b"EXPN list\r\n", ["502 5.5.1"]),
    (b"BDAT 10 LAST\r\n", ["502 5.5.1"]),
    (b"EHLO\r\n", ["501 5.5.4"]),
    (HELLO + b"MAIL FROM:a@b.c\r\n", ["250", "501 5.1.7"]),
    (HELLO + b"MAIL TO:<a@b.c>\r\n", ["250", "501 5.5.4"]),
    (HELLO + b"MAIL FROM:<a@b.c> FOO=1\r\n", ["250", "555 5.5.4"]),
    (HELLO + b"MAIL FROM:<a@b.c> SIZE=99999999999\r\n", ["250", "552 5.3.4"]),
    (HELLO + b"MAIL FROM:<a@b.c> BODY=9BIT\r\n", ["250", "501 5.5.4"]),
    (HELLO + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<not an address>\r\n", ["250", "250 2.1.0",
                                                                    "501 5.1.3"]),
    (HELLO + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z> NOTIFY=NEVER\r\n",
     ["250", "250 2.1.0", "555 5.5.4"]),
    (b"VRFY someone\r\n", ["252 2.0.0"]),
    (b"VRFY\r\n", ["501 5.5.4"]),
    (b"NOOP\r\nHELP\r\nRSET\r\n", ["250 2.0.0", "214 2.0.0", "250 2.0.0"]),
    (b"STARTTLS\r\n", ["502 5.5.1"]),  # no certificate configured
    (HELLO + b"AUTH PLAIN\r\n", ["250", "503 5.5.1"]),  # auth not enabled
    (b"QUIT\r\n", ["221 2.0.0"]),
])
def test_reply_codes(engine: EngineDriver, commands: bytes, expected: list[str]) -> None:
    assert engine.codes(commands) == expected


def test_null_sender_and_postmaster(engine: EngineDriver) -> None:
    assert engine.codes(HELLO + b"MAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n") == [
        "250", "250 2.1.0", "250 2.1.5"]


def test_local_part_case_is_preserved(engine: EngineDriver) -> None:
    engine.feed(HELLO + b"MAIL FROM:<MiXeD@Example.ORG>\r\nRCPT TO:<CaSe@Example.COM>\r\n")
    mails = [e for e in engine.events if isinstance(e, MailFrom | RcptTo)]
    assert mails[0].sender == "MiXeD@Example.ORG" and mails[1].recipient == "CaSe@Example.COM"


def test_smtputf8_addresses_need_the_parameter(engine: EngineDriver) -> None:
    engine.feed(HELLO)
    bad = "MAIL FROM:<用户@例子.测试>\r\n".encode()
    assert engine.codes(bad) == ["501 5.1.7"]
    good = "MAIL FROM:<用户@例子.测试> SMTPUTF8\r\nRCPT TO:<收件人@例子.测试>\r\n".encode()
    assert engine.codes(good) == ["250 2.1.0", "250 2.1.5"]


def test_rejected_recipients_and_data_without_valid_rcpt() -> None:
    drv = EngineDriver(decide=lambda e: Reply.of(554, "5.7.1", "denied")
                       if isinstance(e, RcptTo) else None)
    assert drv.codes(HELLO + TX) == ["250", "250 2.1.0", "554 5.7.1", "554 5.5.1"]
    assert drv.messages == []


def test_max_recipients_then_452() -> None:
    drv = EngineDriver(ServerConfig(max_recipients=100))
    drv.feed(HELLO + b"MAIL FROM:<a@b.c>\r\n")
    rcpts = b"".join(b"RCPT TO:<r%d@example.com>\r\n" % i for i in range(101))
    codes = drv.codes(rcpts)
    assert codes[:100] == ["250 2.1.5"] * 100 and codes[100] == "452 4.5.3"


def test_size_enforced_on_received_bytes_not_declared() -> None:
    drv = EngineDriver(ServerConfig(max_message_size=1000))
    drv.feed(HELLO + b"MAIL FROM:<a@b.c> SIZE=10\r\nRCPT TO:<b@c.d>\r\nDATA\r\n")
    assert drv.codes(b"x" * 500 + b"\r\n" + b"y" * 600 + b"\r\n.\r\n") == ["552 5.3.4"]
    assert drv.messages == []
    assert drv.codes(b"NOOP\r\n") == ["250 2.0.0"]  # session continues


def test_oversize_message_is_not_buffered_without_bound() -> None:
    drv = EngineDriver(ServerConfig(max_message_size=1000))
    drv.feed(HELLO + TX)
    for _ in range(200):
        drv.feed(b"z" * 900 + b"\r\n")
    assert drv.conn.buffered < 70 * 1024
    assert drv.codes(b".\r\n") == ["552 5.3.4"]


def test_long_lines_rejected_not_split(engine: EngineDriver) -> None:
    engine.feed(HELLO + TX)
    assert engine.codes(b"a" * 999 + b"\r\n.\r\n") == ["550 5.6.0"]
    engine.feed(TX)
    assert engine.codes(b"a" * 998 + b"\r\n.\r\n") == ["250 2.0.0"]
    assert engine.codes(b"NOOP " + b"x" * 600 + b"\r\n") == ["500 5.5.2"]
    assert engine.codes(b"X" * 20000) == ["500 5.5.2"]  # no CRLF at all
    assert engine.codes(b"tail\r\nNOOP\r\n") == ["250 2.0.0"]  # resynchronised


def test_nul_in_data_and_commands_rejected(engine: EngineDriver) -> None:
    assert engine.codes(b"NO\x00OP\r\n") == ["500 5.5.2"]
    engine.feed(HELLO + TX)
    assert engine.codes(b"a\x00b\r\n.\r\n") == ["550 5.6.0"]
    assert engine.messages == []


SMUGGLE_ENDINGS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r"]


@pytest.mark.parametrize("fake_end", SMUGGLE_ENDINGS)
def test_smuggling_never_makes_two_messages(fake_end: bytes) -> None:
    drv = EngineDriver()
    drv.feed(HELLO + TX)
    smuggled = (b"Subject: real\r\n\r\nbody" + fake_end + b"MAIL FROM:<ceo@bank.example>\r\n"
                b"RCPT TO:<victim@example.com>\r\nDATA\r\nSubject: spoofed\r\n\r\nx\r\n.\r\n")
    drv.feed(smuggled)
    mails = [e for e in drv.events if isinstance(e, MailFrom)]
    assert len(mails) == 1, "the smuggled MAIL FROM was executed"
    assert drv.messages == []  # the whole thing was one message with bare CR/LF: rejected


def test_bare_lf_in_command_line(engine: EngineDriver) -> None:
    assert engine.codes(b"NOOP\nNOOP\r\n") == ["500 5.5.2"]


def test_starttls_discards_pipelined_plaintext() -> None:
    drv = EngineDriver(tls_cfg())
    drv.feed(HELLO)
    drv.feed(b"STARTTLS\r\nMAIL FROM:<attacker@evil.test>\r\n")
    assert any(isinstance(e, StartTLS) for e in drv.events)
    assert not any(isinstance(e, MailFrom) for e in drv.events)
    # After the handshake: EHLO is needed again (state reset) and STARTTLS is gone.
    assert drv.codes(b"MAIL FROM:<a@b.c>\r\n") == ["503 5.5.1"]
    reply = drv.feed(HELLO).decode()
    assert "STARTTLS" not in reply and "AUTH PLAIN LOGIN" in reply
    assert drv.codes(b"STARTTLS\r\n") == ["554 5.5.1"]


def test_auth_not_offered_or_accepted_in_clear() -> None:
    drv = EngineDriver(tls_cfg())
    assert "AUTH" not in drv.feed(HELLO).decode()
    plain = base64.b64encode(b"\x00user\x00secret")
    assert drv.codes(b"AUTH PLAIN " + plain + b"\r\n") == ["538 5.7.11"]
    assert not any(isinstance(e, AuthRequest) for e in drv.events)


def test_require_tls_gives_530() -> None:
    drv = EngineDriver(tls_cfg(require_tls=True))
    assert drv.codes(HELLO + b"MAIL FROM:<a@b.c>\r\n") == ["250", "530 5.7.0"]


def test_auth_plain_and_login_after_tls() -> None:
    drv = EngineDriver(tls_cfg(), tls=True)
    drv.feed(HELLO)
    assert drv.codes(b"AUTH PLAIN " + base64.b64encode(b"\x00user\x00wrong") + b"\r\n") == [
        "535 5.7.8"]
    assert drv.codes(b"AUTH PLAIN\r\n") == ["334"]  # continuation
    assert drv.out.endswith(b"334 \r\n")
    assert drv.codes(base64.b64encode(b"\x00user\x00secret") + b"\r\n") == ["235 2.7.0"]
    assert drv.codes(b"AUTH LOGIN\r\n") == ["503 5.5.1"]  # already authenticated

    drv = EngineDriver(tls_cfg(), tls=True)
    drv.feed(HELLO + b"AUTH LOGIN\r\n")
    assert drv.out.endswith(b"334 VXNlcm5hbWU6\r\n")
    drv.feed(base64.b64encode(b"user") + b"\r\n")
    assert drv.out.endswith(b"334 UGFzc3dvcmQ6\r\n")
    assert drv.codes(base64.b64encode(b"secret") + b"\r\n") == ["235 2.7.0"]
    auth = next(e for e in drv.events if isinstance(e, AuthRequest))
    assert auth.username == "user" and "secret" not in repr(auth)


def test_auth_errors() -> None:
    drv = EngineDriver(tls_cfg(), tls=True)
    drv.feed(HELLO)
    assert drv.codes(b"AUTH CRAM-MD5\r\n") == ["504 5.5.4"]
    assert drv.codes(b"AUTH PLAIN !!!notbase64\r\n") == ["501 5.5.2"]
    drv.feed(b"AUTH LOGIN\r\n")
    assert drv.codes(b"*\r\n") == ["501 5.0.0"]


def test_too_many_errors_closes_session(engine: EngineDriver) -> None:
    out = engine.feed(b"BOGUS\r\n" * 25).decode()
    assert out.count("500 5.5.2") == 20
    assert out.endswith("421 4.7.0 Error: too many errors\r\n")


def test_helo_is_plain_smtp(engine: EngineDriver) -> None:
    assert engine.feed(b"HELO client\r\n") == b"250 mx.test\r\n"
    assert engine.codes(b"MAIL FROM:<a@b.c> BODY=8BITMIME\r\n") == ["555 5.5.4"]


def test_reply_text_never_carries_control_characters() -> None:
    assert Reply.of(550, "5.1.1", "bad\r\n250 injected").to_bytes() == (
        b"550 5.1.1 bad??250 injected\r\n")
