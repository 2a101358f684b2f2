"""TLS policy and AUTH towards an SES-like upstream (mailhop's own server, trustme certs)."""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

import pytest
from support import MailhopNode, RecordingProxy, mailhop, make_certs, wait_for

MSG = b"Subject: to the smarthost\r\nMessage-ID: <tls@test>\r\n\r\nhello\r\n"
PASSWORD = "Ses-Secret-Pa55"


@pytest.fixture
def upstream_factory(tmp_path: Path):
    """An SES stand-in: AUTH required, optionally STARTTLS, keeps what it receives."""
    nodes: list[MailhopNode] = []
    users = tmp_path / "upstream-users"
    assert mailhop("passwd", str(users), "ses-user", "--password-stdin",
                   stdin=PASSWORD + "\n").returncode == 0

    def make(name: str, *, tls_names: tuple[str, ...] | None = ("smtp.upstream.test",)):
        if tls_names is None:  # a server that "lost" STARTTLS: AUTH offered in clear
            listen = f'auth = "required"\nusers = "{users}"\nallow_plaintext_auth = true\n'
        else:
            certs = make_certs(tmp_path / f"certs-{name}", *tls_names)
            listen = (f'auth = "required"\nusers = "{users}"\n'
                      f'tls = {{ cert = "{certs.cert}", key = "{certs.key}" }}\n')
        node = MailhopNode(tmp_path / name, name=name, networks=(), listen=listen, relay=None,
                           extra="[queue]\nhold_delivery = true\n").start()
        node.ca = tmp_path / f"certs-{name}" / "ca.pem"  # type: ignore[attr-defined]
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


def egress_for(tmp_path: Path, port: int, *, host: str = "127.0.0.1", tls: str,
               ca: Path | None = None, sasl_passwd: bool = False) -> MailhopNode:
    creds = tmp_path / "ses.secret"
    if sasl_passwd:  # the seed's Postfix file, used as is
        creds.write_text(f"[{host}]:{port} ses-user:{PASSWORD}\n")
    else:
        creds.write_text(f"ses-user:{PASSWORD}\n")
    creds.chmod(0o600)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 smtp.upstream.test wrong.upstream.test\n")
    hop = f'tls = "{tls}"\ncredentials = "{creds}"\n' + (f'ca_file = "{ca}"\n' if ca else "")
    return MailhopNode(tmp_path / "egress", name="egress", relay=f"[{host}]:{port}", hop=hop,
                       queue='min_backoff = "1h"\nmax_backoff = "2h"\n',
                       extra=f'[resolver]\nhosts = "{hosts}"\n').start()


def submit(node: MailhopNode) -> None:
    with smtplib.SMTP(node.host, node.port) as s:
        s.sendmail("app@example.com", ["user@example.net"], MSG)


def wait_status(node: MailhopNode, status: str) -> str:
    m = wait_for(lambda: re.search(rf"to=<user@example\.net>, .*status={status} \((.*)\)$",
                                   node.log(), re.M), timeout=20, what=f"status={status}")
    return m.group(0)


def test_encrypt_with_sasl_passwd_delivers(tmp_path: Path, upstream_factory) -> None:
    up = upstream_factory("ses")
    egress = egress_for(tmp_path, up.port, tls="encrypt", sasl_passwd=True)
    try:
        submit(egress)
        line = wait_status(egress, "sent")
        assert "dsn=2.0.0" in line and "queued as" in line
        assert len(up.queue()) == 1
        assert "sasl_method=PLAIN, sasl_username=ses-user" in up.log()
        assert PASSWORD not in egress.log() + up.log()
    finally:
        egress.stop()


def test_verify_checks_certificate_and_name(tmp_path: Path, upstream_factory) -> None:
    up = upstream_factory("ses")
    egress = egress_for(tmp_path, up.port, host="smtp.upstream.test", tls="verify", ca=up.ca)
    try:
        submit(egress)
        assert "status=sent" in wait_status(egress, "sent")
        assert "relay=smtp.upstream.test[127.0.0.1]" in egress.log()
    finally:
        egress.stop()


def test_verify_rejects_wrong_hostname(tmp_path: Path, upstream_factory) -> None:
    up = upstream_factory("ses")
    proxy = RecordingProxy(up.port)
    egress = egress_for(tmp_path, proxy.port, host="wrong.upstream.test", tls="verify",
                        ca=up.ca)
    try:
        submit(egress)
        line = wait_status(egress, "deferred")
        assert "dsn=4.7.5" in line and "TLS handshake" in line
        assert re.search(r"certificate verify failed|[Hh]ostname mismatch", line), line
        assert up.queue() == []
        assert b"AUTH" not in proxy.client_bytes and PASSWORD.encode() not in proxy.client_bytes
    finally:
        egress.stop()
        proxy.close()


@pytest.mark.parametrize(("policy", "dsn", "why"), [
    ("encrypt", "4.7.4", "TLS is required, but was not offered"),
    ("verify", "4.7.4", "TLS is required, but was not offered"),
    ("may", "4.7.0", "refusing to send credentials"),
])
def test_stripped_starttls_never_leaks_the_password(tmp_path: Path, upstream_factory,
                                                     policy: str, dsn: str, why: str) -> None:
    up = upstream_factory("stripped", tls_names=None)
    proxy = RecordingProxy(up.port)
    egress = egress_for(tmp_path, proxy.port, tls=policy)
    try:
        submit(egress)
        line = wait_status(egress, "deferred")
        assert f"dsn={dsn}" in line and why in line
        assert up.queue() == []
        wire = bytes(proxy.client_bytes)
        assert b"EHLO" in wire  # we did talk to it
        assert b"AUTH" not in wire and PASSWORD.encode() not in wire
        assert b"MAIL FROM" not in wire
    finally:
        egress.stop()
        proxy.close()


def test_credentials_file_must_be_private(tmp_path: Path) -> None:
    creds = tmp_path / "ses.secret"
    creds.write_text("user:pw\n")
    creds.chmod(0o644)
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"""
[node]
spool = "spool"
[[listen]]
address = "127.0.0.1:2525"
[relay]
default = "ses"
[nexthop.ses]
host = "email-smtp.us-east-1.amazonaws.com"
port = 587
tls = "verify"
credentials = "{creds}"
""")
    result = mailhop("check-config", "-c", str(cfg))
    assert result.returncode == 2
    assert "nexthop.ses.credentials" in result.stderr and "chmod 600" in result.stderr
