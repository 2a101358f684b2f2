"""The sans-IO client engine, the router, credentials and DSN building, without sockets."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from conftest import EngineDriver
from hypothesis import given, settings
from hypothesis import strategies as st

from mailhop.config import RelayConfig, RouteRule
from mailhop.delivery.bounce import Failure, build_dsn
from mailhop.delivery.credentials import CredentialsError, load_credentials
from mailhop.delivery.resolver import parse_hosts
from mailhop.delivery.router import Router
from mailhop.protocol.client import (
    Capabilities,
    ClientConnection,
    ClientProtocolError,
    Transaction,
    dot_stuff,
)
from mailhop.protocol.replies import Reply, ReplyParser


def test_reply_parser_multiline_and_enhanced() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 100") == []
    [reply] = parser.feed(b"\r\n")
    assert reply.code == 250 and reply.lines == ("mx.test", "PIPELINING", "SIZE 100")
    [reply] = parser.feed(b"550 5.1.1 <a@b>: no such user\r\n")
    assert (reply.enhanced, reply.lines) == ("5.1.1", ("<a@b>: no such user",))
    with pytest.raises(ValueError):
        parser.feed(b"hello there\r\n")


def test_capabilities() -> None:
    caps = Capabilities.from_ehlo(Reply(250, "", ("mx", "PIPELINING", "SIZE 1000", "STARTTLS",
                                                  "AUTH PLAIN login", "SMTPUTF8", "8BITMIME")))
    assert caps.pipelining and caps.starttls and caps.smtputf8 and caps.eightbitmime
    assert caps.size == 1000 and caps.auth == ("PLAIN", "LOGIN")


def test_pipelined_transaction_pairs_replies() -> None:
    client = ClientConnection("relay.test")
    assert client.receive_data(b"220 mx ESMTP\r\n") == [("greeting", Reply.of(220, "",
                                                                            "mx ESMTP"))]
    wire = client.transaction("a@b.c", {"SIZE": "10"}, ["x@y.z", "q@y.z"])
    assert wire == (b"MAIL FROM:<a@b.c> SIZE=10\r\nRCPT TO:<x@y.z>\r\nRCPT TO:<q@y.z>\r\n"
                    b"DATA\r\n")
    got = client.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no\r\n354 go\r\n")
    assert [tag for tag, _ in got] == ["mail", "rcpt", "rcpt", "data"]
    tx = Transaction(["x@y.z", "q@y.z"], got[0][1], [got[1][1], got[2][1]], got[3][1],
                     Reply.of(250, "2.0.0", "queued"))
    assert [(r.status, r.dsn, r.stage) for r in tx.results()] == [
        ("sent", "2.0.0", "END-OF-DATA"), ("bounced", "5.1.1", "RCPT")]


def test_transaction_results_failures_by_stage() -> None:
    tx = Transaction(["a@x", "b@x"], Reply.of(451, "4.3.0", "later"))
    assert {r.status for r in tx.results()} == {"deferred"}
    tx = Transaction(["a@x"], Reply.of(250, "2.1.0", "ok"), [Reply.of(250, "2.1.5", "ok")],
                     Reply.of(354, "", "go"))  # final reply never came
    [result] = tx.results()
    assert result.status == "deferred" and result.dsn == "4.4.2"


def test_envelope_injection_refused() -> None:
    client = ClientConnection("relay.test")
    with pytest.raises(ClientProtocolError):
        client.mail("a@b.c\r\nRCPT TO:<evil@x>", {})
    with pytest.raises(ClientProtocolError):
        client.rcpt("x@y\nDATA")
    with pytest.raises(ClientProtocolError):
        client.mail("a@b.c", {"ENVID": "x\r\nQUIT"})


def test_refused_commands_register_no_reply() -> None:
    """A transaction or message that cannot be built leaves replies pairing as before."""
    client = ClientConnection("relay.test")
    client.receive_data(b"220 mx\r\n")
    with pytest.raises(ClientProtocolError):
        client.transaction("a@b.c", {}, ["ok@y.z", "x@y\nDATA"])
    with pytest.raises(ClientProtocolError):
        client.message(b"bare\nLF\r\n")
    assert client.waiting == 0
    client.rset()
    assert client.receive_data(b"250 2.0.0 Ok\r\n") == [("rset", Reply.of(250, "2.0.0", "Ok"))]


def test_dot_stuffing_and_bare_newlines() -> None:
    assert dot_stuff(b".a\r\nb\r\n..c\r\n") == b"..a\r\nb\r\n...c\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b"no final newline") == b"no final newline\r\n.\r\n"
    for bad in (b"a\n.\nb\r\n", b"a\r.\rb\r\n", b"x\ny\r\n"):
        with pytest.raises(ClientProtocolError):
            dot_stuff(bad)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_client_output_is_received_identically_by_the_server(body: bytes) -> None:
    """What the client engine sends, the server engine receives byte for byte."""
    canonical = b"".join(line[:900] + b"\r\n" for line in
                         body.replace(b"\r", b"").replace(b"\x00", b"").split(b"\n"))
    client = ClientConnection("relay.test")
    server = EngineDriver()
    wire = b"EHLO relay.test\r\n" + client.transaction("a@b.c", {}, ["d@e.f"]) + \
        client.message(canonical)
    server.feed(wire)
    [msg] = server.messages
    assert msg.data == canonical


def test_starttls_response_injection_detected() -> None:
    client = ClientConnection("relay.test")
    client.receive_data(b"220 mx\r\n")
    client.ehlo()
    client.receive_data(b"250-mx\r\n250 STARTTLS\r\n")
    client.starttls()
    with pytest.raises(ClientProtocolError):
        client.receive_data(b"220 go ahead\r\n250 injected\r\n")


def test_auth_plain_encoding() -> None:
    client = ClientConnection("relay.test")
    line = client.auth_plain("user", "pw")
    assert base64.b64decode(line.split()[-1]) == b"\0user\0pw"


def test_router_first_match_wins() -> None:
    router = Router(RelayConfig("tokyo", (
        RouteRule("direct", ("example.cn", ".example.cn")),
        RouteRule("ses", (), ("@billing.example.com",), 1),
        RouteRule("bulk", ("gmail.com",), ("*@news.example.com",), 2),
    )))
    assert router.route("a@example.cn").hop == "direct"
    assert router.route("a@mx.example.cn").hop == "direct"
    assert router.route("a@notexample.cn").hop == "tokyo"
    assert router.route("a@gmail.com", "x@billing.example.com").hop == "ses"
    assert router.route("a@gmail.com", "x@news.example.com").hop == "bulk"
    assert router.route("a@gmail.com", "x@other.example.com").hop == "tokyo"


def test_credentials_formats(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("AKIAUSER:secret:with:colons\n")
    creds = load_credentials(plain, "email-smtp.us-east-1.amazonaws.com", 587, False)
    assert (creds.user, creds.password) == ("AKIAUSER", "secret:with:colons")
    assert "secret" not in repr(creds)
    sasl = tmp_path / "sasl_passwd"
    sasl.write_text("# seed file\n[smtp.gmail.com]:587 g@gmail.com:gpw\n"
                    "[email-smtp.us-east-1.amazonaws.com]:587 SES:sespw\n")
    creds = load_credentials(sasl, "email-smtp.us-east-1.amazonaws.com", 587, False)
    assert (creds.user, creds.password) == ("SES", "sespw")
    with pytest.raises(CredentialsError):
        load_credentials(sasl, "other.example", 25, True)


def test_hosts_file(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 a.test b.test # comment\n::1 a.test\nbogus line\n")
    assert parse_hosts(hosts) == {"a.test": ["127.0.0.1", "::1"], "b.test": ["127.0.0.1"]}


def test_dsn_structure() -> None:
    original = b"Subject: hello\r\nFrom: a@b.c\r\n\r\nbody\r\n"
    dsn = build_dsn(reporting_mta="relay.test", queue_id="ABC", sender="a@b.c",
                    arrival=0.0, original=original,
                    failures=[Failure("x@y.z", "5.1.1", "550 5.1.1 no such user", "mx.y.z")])
    text = dsn.decode()
    assert "Content-Type: multipart/report; report-type=delivery-status" in text
    assert "Reporting-MTA: dns; relay.test" in text
    assert "Final-Recipient: rfc822; x@y.z\r\nAction: failed\r\nStatus: 5.1.1" in text
    assert "Remote-MTA: dns; mx.y.z" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in text
    assert "Content-Type: text/rfc822-headers\r\n\r\nSubject: hello\r\nFrom: a@b.c\r\n" in text
    assert "body" not in text.split("text/rfc822-headers")[1]
    dsn.decode("ascii")
    crlf = dsn.count(b"\r\n")
    assert dsn.count(b"\n") == crlf and dsn.count(b"\r") == crlf  # canonical line ends
