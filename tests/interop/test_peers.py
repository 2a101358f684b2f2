"""Interop with real peers from Debian packages: Postfix as upstream, swaks as client."""

from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path

import pytest
from support import MailhopNode, PostfixInstance, auth_node, require_peer

pytestmark = pytest.mark.interop


def swaks(*args: str) -> subprocess.CompletedProcess:
    require_peer("swaks")
    return subprocess.run(["swaks", "--timeout", "20", *args], capture_output=True, text=True,
                          timeout=60)


def test_postfix_relays_into_mailhop(tmp_path: Path) -> None:
    node = MailhopNode(tmp_path / "mailhop").start()
    postfix = PostfixInstance(tmp_path / "postfix",
                              relayhost=f"[127.0.0.1]:{node.port}").start()
    try:
        with smtplib.SMTP("127.0.0.1", postfix.port) as s:
            s.sendmail("app@example.org", ["user@example.com"],
                       b"Subject: via postfix\r\nMessage-ID: <pf@test>\r\n\r\nhello\r\n")
        match = postfix.wait_log(r"status=sent \(250 2\.0\.0 Ok: queued as ([0-9A-F]+)\)")
        queue_id = match.group(1)
        [entry] = node.queue()
        assert entry["queue_id"] == queue_id
        assert entry["recipients"][0]["address"] == "user@example.com"
        assert f"relay=127.0.0.1[127.0.0.1]:{node.port}" in postfix.log()
    finally:
        postfix.stop()
        node.stop()


def test_swaks_plain_and_pipelined(tmp_path: Path) -> None:
    node = MailhopNode(tmp_path / "mailhop").start()
    try:
        for extra in ([], ["--pipeline"]):
            result = swaks("--server", f"127.0.0.1:{node.port}", "--from", "a@example.org",
                           "--to", "b@example.com,c@example.com", *extra)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "250 2.0.0 Ok: queued as" in result.stdout
        assert len(node.queue()) == 2
    finally:
        node.stop()


def test_swaks_starttls_and_auth(tmp_path: Path) -> None:
    node = auth_node(tmp_path, "app", "pw-123", networks=("127.0.0.1/32",))
    try:
        base = ["--server", f"127.0.0.1:{node.port}", "--from", "a@example.org",
                "--to", "b@example.com", "--local-interface", "127.0.0.2"]
        # AUTH in clear is refused before any password is accepted.
        clear = swaks(*base, "--auth", "PLAIN", "--auth-user", "app", "--auth-password",
                      "pw-123")
        assert "Host did not advertise authentication" in clear.stderr
        assert " -> AUTH" not in clear.stdout  # the password never left swaks
        assert node.queue() == []
        for mech in ("PLAIN", "LOGIN"):
            result = swaks(*base, "--tls", "--auth", mech, "--auth-user", "app",
                           "--auth-password", "pw-123")
            assert result.returncode == 0, result.stdout + result.stderr
            assert "235 2.7.0" in result.stdout and "queued as" in result.stdout
        bad = swaks(*base, "--tls", "--auth", "PLAIN", "--auth-user", "app",
                    "--auth-password", "nope")
        assert bad.returncode != 0 and "535 5.7.8" in bad.stdout
        denied = swaks(*base, "--tls")
        assert "554 5.7.1" in denied.stdout
        assert len(node.queue()) == 2
        assert "pw-123" not in node.log()
    finally:
        node.stop()
