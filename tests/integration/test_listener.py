"""A real ``mailhop serve`` process on loopback, spoken to over real sockets."""

from __future__ import annotations

import base64
import signal
import smtplib
import socket
import ssl
import time
from pathlib import Path

import pytest
from support import MailhopNode, auth_node, mailhop, make_certs, wait_for

MSG = (b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hi\r\nMessage-ID: <m1@test>\r\n"
       b"\r\nhello\r\n")


@pytest.fixture
def node(tmp_path: Path):
    n = MailhopNode(tmp_path / "node", networks=("127.0.0.1/32",)).start()
    yield n
    n.stop()


@pytest.fixture
def tls_node(tmp_path: Path):
    n = auth_node(tmp_path, "app", "s3cret-pw", networks=("127.0.0.1/32",))
    yield n
    n.stop()


def client_ctx(node) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(node.certs.ca))


def test_smtplib_delivers_and_message_is_queued(node: MailhopNode) -> None:
    with smtplib.SMTP(node.host, node.port) as s:
        s.ehlo("app.test")
        s.mail("a@example.org")
        s.rcpt("b@example.com")
        s.rcpt("c@example.com")
        code, text = s.data(MSG)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    queue_id = text.split()[-1].decode()
    [entry] = node.queue()
    assert entry["queue_id"] == queue_id
    assert entry["sender"] == "a@example.org"
    assert [r["address"] for r in entry["recipients"]] == ["b@example.com", "c@example.com"]
    assert all(r["state"] in ("queued", "deferred") for r in entry["recipients"])
    shown = mailhop("queue", "show", "--spool", str(node.spool), queue_id, "--body")
    assert shown.returncode == 0
    assert "Received: from app.test (unknown [127.0.0.1])" in shown.stdout
    assert f"with ESMTP id {queue_id}" in shown.stdout
    assert shown.stdout.rstrip().endswith("hello")
    log = node.log()
    assert f"{queue_id}: client=unknown[127.0.0.1]" in log
    assert f"{queue_id}: message-id=<m1@test>" in log
    assert f"{queue_id}: from=<a@example.org>, size=" in log and "nrcpt=2 (queue active)" in log


def test_ipv6_listener(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    n = MailhopNode(tmp_path / "v6", host="::1", networks=("::1/128",)).start()
    try:
        with smtplib.SMTP("::1", n.port) as s:
            s.sendmail("a@example.org", ["b@example.com"], MSG)
        assert len(n.queue()) == 1
    finally:
        n.stop()


OPEN_RELAY_FORMS = ["victim@example.com", "user%victim.test@example.com",
                    '"user@victim.test"@example.com', "@relay.test:user@victim.test",
                    "victim.test!user@example.com"]


def test_open_relay_refused_from_unlisted_address(node: MailhopNode) -> None:
    with smtplib.SMTP(node.host, node.port, source_address=("127.0.0.2", 0)) as s:
        s.ehlo("outsider.test")
        s.mail("spammer@example.net")
        for rcpt in OPEN_RELAY_FORMS:
            code, text = s.docmd("RCPT", f"TO:<{rcpt}>")
            assert (code, text[:5]) == (554, b"5.7.1"), rcpt
            assert b"Relay access denied" in text
        code, _ = s.docmd("DATA")
        assert code == 554
    assert node.queue() == []
    assert "NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 554 5.7.1" in node.log()


def test_auth_before_tls_refused_and_not_offered(tls_node: MailhopNode) -> None:
    with smtplib.SMTP(tls_node.host, tls_node.port) as s:
        s.ehlo("client.test")
        assert not s.has_extn("auth")
        code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0app\0s3cret-pw").decode())
        assert (code, text[:6]) == (538, b"5.7.11")


def test_auth_after_starttls_permits_relay(tls_node: MailhopNode) -> None:
    with smtplib.SMTP(tls_node.host, tls_node.port, source_address=("127.0.0.2", 0)) as s:
        s.starttls(context=client_ctx(tls_node))
        s.ehlo("client.test")
        assert "PLAIN" in s.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            s.login("app", "wrong")
        assert err.value.smtp_code == 535
        s.login("app", "s3cret-pw")
        refused = s.sendmail("app@example.org", ["x@example.com"], MSG)
        assert refused == {}
    [entry] = tls_node.queue()
    assert entry["recipients"][0]["address"] == "x@example.com"
    log = tls_node.log()
    assert "s3cret-pw" not in log and "wrong" not in log.replace("warning", "")
    assert "sasl_method=PLAIN, sasl_username=app" in log


def test_users_file_must_be_private(tmp_path: Path) -> None:
    users = tmp_path / "users"
    mailhop("passwd", str(users), "app", "--password-stdin", stdin="pw\n")
    assert users.stat().st_mode & 0o777 == 0o600
    users.chmod(0o644)
    certs = make_certs(tmp_path / "c")
    n = MailhopNode(tmp_path / "n", listen=f"""\
        auth = "optional"
        users = "{users}"
        tls = {{ cert = "{certs.cert}", key = "{certs.key}" }}
        """)
    result = mailhop("check-config", "-c", str(n.config))
    assert result.returncode == 2
    assert "listen[0].users" in result.stderr and "chmod 600" in result.stderr


def recv_reply(sock) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] == b" ":
            return data


def test_starttls_injection_is_not_executed(tls_node: MailhopNode) -> None:
    raw = socket.create_connection((tls_node.host, tls_node.port))
    recv_reply(raw)
    raw.sendall(b"EHLO x\r\n")
    recv_reply(raw)
    raw.sendall(b"STARTTLS\r\nHELP\r\n")  # HELP is injected in clear
    assert recv_reply(raw).startswith(b"220 2.0.0")
    tls = client_ctx(tls_node).wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"NOOP\r\n")
    time.sleep(0.2)
    reply = recv_reply(tls)
    assert reply == b"250 2.0.0 Ok\r\n", reply  # no 214 from the injected HELP
    tls.sendall(b"EHLO x\r\n")
    caps = recv_reply(tls)
    assert b"STARTTLS" not in caps and b"AUTH PLAIN LOGIN" in caps
    tls.close()


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r"])
def test_smuggling_over_the_wire(node: MailhopNode, fake_end: bytes) -> None:
    sock = socket.create_connection((node.host, node.port))
    recv_reply(sock)
    sock.sendall(b"EHLO x\r\n")
    recv_reply(sock)
    sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    time.sleep(0.1)
    recv_reply(sock)
    sock.sendall(b"Subject: one\r\n\r\nreal" + fake_end
                 + b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
                 b"Subject: smuggled\r\n\r\nx\r\n.\r\nQUIT\r\n")
    replies = b""
    while chunk := sock.recv(4096):
        replies += chunk
    sock.close()
    assert b"550 5.6.0" in replies
    assert node.queue() == []  # neither the carrier nor the smuggled message was accepted


def test_accepted_mail_survives_kill_9(node: MailhopNode) -> None:
    ids = []
    for i in range(5):
        with smtplib.SMTP(node.host, node.port) as s:
            s.ehlo("x")
            s.mail("a@example.org")
            s.rcpt(f"r{i}@example.com")
            code, text = s.data(MSG)
            assert code == 250
            ids.append(text.split()[-1].decode())
    node.kill9()  # no chance to flush or close anything
    assert sorted(e["queue_id"] for e in node.queue()) == sorted(ids)
    node.start()
    assert sorted(e["queue_id"] for e in node.queue()) == sorted(ids)
    with smtplib.SMTP(node.host, node.port) as s:  # and the node serves again
        assert s.noop()[0] == 250


def test_sigterm_lets_a_message_in_data_finish(node: MailhopNode) -> None:
    s = smtplib.SMTP(node.host, node.port)
    s.ehlo("x")
    s.mail("a@example.org")
    s.rcpt("b@example.com")
    code, _ = s.docmd("DATA")
    assert code == 354
    s.send(b"Subject: slow\r\n\r\nfirst part\r\n")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):  # new sessions are refused while draining
        smtplib.SMTP(node.host, node.port, timeout=2).noop()
    s.send(b"second part\r\n.\r\n")
    code, text = s.getreply()
    assert code == 250 and b"queued as" in text
    assert node.proc.wait(10) == 0
    assert len(node.queue()) == 1


def test_idle_timeout_closes_session(tmp_path: Path) -> None:
    n = MailhopNode(tmp_path / "n", listen='idle_timeout = "1s"\n').start()
    try:
        sock = socket.create_connection((n.host, n.port))
        recv_reply(sock)
        sock.settimeout(5)
        started = time.monotonic()
        assert recv_reply(sock).startswith(b"421 4.4.2")
        assert 0.8 < time.monotonic() - started < 4
        sock.close()
    finally:
        n.stop()


def test_connection_limits(tmp_path: Path) -> None:
    n = MailhopNode(tmp_path / "n", networks=("127.0.0.1/32",),
                    listen="max_connections_per_ip = 2\nmax_connections = 3\n").start()
    try:
        held = [socket.create_connection((n.host, n.port), source_address=("127.0.0.2", 0))
                for _ in range(2)]
        for sock in held:
            assert recv_reply(sock).startswith(b"220")
        extra = socket.create_connection((n.host, n.port), source_address=("127.0.0.2", 0))
        assert recv_reply(extra).startswith(b"421 4.7.0")
        trusted = socket.create_connection((n.host, n.port))  # 127.0.0.1: exempt per-IP
        assert recv_reply(trusted).startswith(b"220")
        over = socket.create_connection((n.host, n.port))
        assert recv_reply(over).startswith(b"421 4.7.0")  # global limit
        for sock in [*held, extra, trusted, over]:
            sock.close()
    finally:
        n.stop()


def test_mail_loop_is_rejected(node: MailhopNode) -> None:
    looped = b"".join(b"Received: from hop%d\r\n" % i for i in range(51)) + MSG
    with smtplib.SMTP(node.host, node.port) as s, pytest.raises(smtplib.SMTPDataError) as err:
        s.sendmail("a@example.org", ["b@example.com"], looped)
    assert err.value.smtp_code == 554 and err.value.smtp_error.startswith(b"5.4.6")
    assert node.queue() == []


def test_second_node_on_same_spool_refused(node: MailhopNode) -> None:
    result = mailhop("serve", "-c", str(node.config), timeout=20)
    assert result.returncode == 1
    assert "in use by another mailhop" in result.stderr and "Traceback" not in result.stderr
    wait_for(lambda: node.proc is not None and node.proc.poll() is None)


def test_auth_brute_force_is_slowed_then_blocked_per_address(tmp_path: Path) -> None:
    n = auth_node(tmp_path, "app", "right", networks=("127.0.0.1/32",),
                  listen="auth_failure_limit = 2\nauth_ip_failure_limit = 4\n")
    ctx = client_ctx(n)
    try:
        for _ in range(2):  # two sessions of two failures each: the address is blocked
            s = smtplib.SMTP(n.host, n.port, source_address=("127.0.0.3", 0))
            s.starttls(context=ctx)
            started = time.monotonic()
            for _ in range(2):
                with pytest.raises(smtplib.SMTPException):
                    s.login("app", "wrong")
            assert time.monotonic() - started >= 0.7  # each failure costs the attacker time
            with pytest.raises(smtplib.SMTPServerDisconnected):
                s.noop()  # 421 and disconnect after the per-session limit
        blocked = socket.create_connection((n.host, n.port), source_address=("127.0.0.3", 0))
        assert recv_reply(blocked).startswith(b"421 4.7.0 Error: too many authentication")
        blocked.close()
        with smtplib.SMTP(n.host, n.port, source_address=("127.0.0.4", 0)) as s:
            s.starttls(context=ctx)
            s.login("app", "right")  # other addresses are not punished
        assert "blocked for 600s after repeated AUTH failures" in n.log()
    finally:
        n.stop()
