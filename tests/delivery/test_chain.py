"""Delivery onward: two-hop chains into real Postfix, partial acceptance, outages, bounces."""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import time
from pathlib import Path

import pytest
from support import (
    MailhopNode,
    PostfixInstance,
    free_port,
    mailhop,
    require_peer,
    strip_trace,
    wait_for,
)

pytestmark = pytest.mark.interop

ORIGINAL = (
    b"From: App <app@example.com>\r\nTo: user@example.com\r\nSubject: chain test\r\n"
    b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <chain-1@app.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    b"8-bit: \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xc3\xa9\r\n"
    b".a line that starts with a dot\r\n..two dots\r\n"
    + b"x" * 998 + b"\r\nend\r\n"  # the longest legal line
)


def send(port: int, sender: str, rcpts: list[str], data: bytes = ORIGINAL) -> str:
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("app.test")
        s.mail(sender, ["BODY=8BITMIME"])
        for r in rcpts:
            code, _ = s.rcpt(r)
            assert code == 250
        code, text = s.data(data)
    assert code == 250, text
    return text.split()[-1].decode()


@pytest.fixture
def final(tmp_path: Path):
    require_peer("postfix")
    pf = PostfixInstance(tmp_path / "final").final_hop(access={
        "defer@example.com": "450 4.2.0 try again later",
        "reject@example.com": "550 5.1.1 no such user",
    }).start()
    yield pf
    pf.stop()


def test_two_hop_chain_byte_identical(tmp_path: Path, final: PostfixInstance) -> None:
    egress = MailhopNode(tmp_path / "egress", name="egress",
                         relay=f"[127.0.0.1]:{final.port}").start()
    ingress = MailhopNode(tmp_path / "ingress", name="ingress",
                          relay=f"[127.0.0.1]:{egress.port}").start()
    try:
        qid = send(ingress.port, "app@example.com", ["user@example.com"])
        [delivered] = wait_for(final.delivered, timeout=30, what="delivery into Postfix")
        assert strip_trace(delivered) == strip_trace(ORIGINAL)
        received = [line for line in delivered.split(b"\n") if line.startswith(b"Received:")]
        assert len(received) == 3  # ingress, egress, Postfix
        # Hop by hop: ingress ID -> egress ID -> Postfix ID, all in the maillogs.
        m = wait_for(lambda: re.search(
            rf"{qid}: to=<user@example\.com>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{egress.port}, "
            r"delay=[\d.]+, delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=2\.0\.0, "
            r"status=sent \(250 2\.0\.0 Ok: queued as ([0-9A-F]+)\)", ingress.log()))
        egress_id = m.group(1)
        m = wait_for(lambda: re.search(
            rf"{egress_id}: to=<user@example\.com>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:"
            rf"{final.port}, .*status=sent \(250 2\.0\.0 Ok: queued as ([0-9A-F]+)\)",
            egress.log()))
        assert m.group(1) in final.log()
        wait_for(lambda: f"{qid}: removed" in ingress.log() and f"{egress_id}: removed"
                 in egress.log(), what="removed lines")
        assert ingress.queue() == [] and egress.queue() == []
    finally:
        ingress.stop()
        egress.stop()


def test_partial_acceptance_sent_deferred_bounced(tmp_path: Path,
                                                  final: PostfixInstance) -> None:
    node = MailhopNode(tmp_path / "node", relay=f"[127.0.0.1]:{final.port}",
                       queue='min_backoff = "1h"\nmax_backoff = "2h"\n').start()
    try:
        qid = send(node.port, "sender@example.com",
                   ["ok@example.com", "defer@example.com", "reject@example.com"])
        wait_for(lambda: "sender non-delivery notification" in node.log(), timeout=20)
        log = node.log()
        assert re.search(rf"{qid}: to=<ok@example\.com>, .*dsn=2\.0\.0, status=sent", log)
        assert re.search(rf"{qid}: to=<defer@example\.com>, .*dsn=4\.2\.0, status=deferred "
                         r"\(host 127\.0\.0\.1\[127\.0\.0\.1\]:\d+ said: 450 4\.2\.0 .*try again "
                         r"later \(in reply to RCPT command\)\)", log)
        assert re.search(rf"{qid}: to=<reject@example\.com>, .*dsn=5\.1\.1, status=bounced",
                         log)
        [entry] = [e for e in node.queue() if e["queue_id"] == qid]
        states = {r["address"]: r["state"] for r in entry["recipients"]}
        assert states == {"ok@example.com": "sent", "defer@example.com": "deferred",
                          "reject@example.com": "bounced"}
        # One DSN reached the sender (through the same hop), about the bounced recipient only.
        messages = wait_for(lambda: len(final.delivered()) >= 2 and final.delivered(),
                            timeout=20, what="the DSN")
        dsn = next(m for m in messages if b"multipart/report" in m)
        assert b"report-type=delivery-status" in dsn
        assert b"Final-Recipient: rfc822; reject@example.com" in dsn
        assert b"Action: failed" in dsn and b"Status: 5.1.1" in dsn
        assert b"Diagnostic-Code: smtp; " in dsn and b"no such user" in dsn
        assert b"defer@example.com" not in dsn.split(b"Content-Type: text/rfc822-headers")[0]
        assert b"Subject: chain test" in dsn  # returned headers
        assert b"Return-Path: <>" in dsn  # from the null sender
    finally:
        node.stop()


def test_null_sender_is_never_bounced(tmp_path: Path, final: PostfixInstance) -> None:
    node = MailhopNode(tmp_path / "node", relay=f"[127.0.0.1]:{final.port}").start()
    try:
        qid = send(node.port, "", ["reject@example.com"])
        wait_for(lambda: f"{qid}: removed" in node.log(), timeout=20)
        assert "status=bounced" in node.log()
        assert "non-delivery notification" not in node.log()
        assert node.queue() == []
    finally:
        node.stop()


def test_next_hop_down_defers_then_delivers(tmp_path: Path, final: PostfixInstance) -> None:
    egress_port = free_port()
    ingress = MailhopNode(tmp_path / "ingress", relay=f"[127.0.0.1]:{egress_port}").start()
    egress = MailhopNode(tmp_path / "egress", relay=f"[127.0.0.1]:{final.port}")
    egress.port = egress_port
    egress.config.write_text(re.sub(r'address = "127\.0\.0\.1:\d+"',
                                    f'address = "127.0.0.1:{egress_port}"',
                                    egress.config.read_text()))
    try:
        qid = send(ingress.port, "app@example.com", ["user@example.com"])
        wait_for(lambda: re.search(
            rf"{qid}: to=<user@example\.com>, relay=none, .*dsn=4\.4\.1, status=deferred "
            rf"\(connect to 127\.0\.0\.1\[127\.0\.0\.1\]:{egress_port}: Connection refused\)",
            ingress.log()), timeout=20, what="the deferral")
        [entry] = ingress.queue()
        rcpt = entry["recipients"][0]
        assert rcpt["state"] == "deferred" and rcpt["attempts"] >= 1
        assert rcpt["next_attempt"] > entry["arrival"]  # backoff, not a busy loop
        egress.start()
        wait_for(lambda: final.delivered(), timeout=30, what="delivery after the outage")
        wait_for(lambda: f"{qid}: removed" in ingress.log(), timeout=10)
    finally:
        ingress.stop()
        egress.stop()


def test_restart_keeps_deferred_mail(tmp_path: Path, final: PostfixInstance) -> None:
    dead = free_port()
    node = MailhopNode(tmp_path / "node", relay=f"[127.0.0.1]:{dead}").start()
    try:
        qid = send(node.port, "app@example.com", ["user@example.com"])
        wait_for(lambda: "status=deferred" in node.log(), timeout=20)
        node.kill9()
        node.config.write_text(node.config.read_text().replace(f"port = {dead}",
                                                               f"port = {final.port}"))
        node.start()
        wait_for(lambda: final.delivered(), timeout=30, what="delivery after restart")
        wait_for(lambda: f"{qid}: removed" in node.log(), timeout=10)
    finally:
        node.stop()


def test_pflogsumm_counts_match(tmp_path: Path, final: PostfixInstance) -> None:
    require_peer("pflogsumm")
    json_log = tmp_path / "mailhop.json"
    node = MailhopNode(tmp_path / "node", relay=f"[127.0.0.1]:{final.port}",
                       queue='min_backoff = "1h"\nmax_backoff = "2h"\n')
    node.config.write_text(node.config.read_text().replace(
        "[log]\n", f'[log]\njson = "{json_log}"\n'))
    node.start()
    try:
        for rcpts in (["ok@example.com"], ["user@example.com"], ["defer@example.com"],
                      ["reject@example.com"]):
            send(node.port, "", rcpts)  # null sender: no DSN traffic to count
        wait_for(lambda: node.log().count(" status=") >= 4, timeout=20)
    finally:
        node.stop()
    out = subprocess.run(["pflogsumm", "--syslog-name=mailhop", str(node.maillog)],
                         capture_output=True, text=True, timeout=60).stdout
    counts = {m.group(2): int(m.group(1)) for m in
              re.finditer(r"^\s*(\d+)\s+(received|delivered|deferred|bounced)\b", out, re.M)}
    assert counts == {"received": 4, "delivered": 2, "deferred": 1, "bounced": 1}, out[:1500]
    # The JSON log carries the same facts for machines.
    records = [json.loads(line) for line in json_log.read_text().splitlines()]
    statuses = sorted(r["status"] for r in records if r["program"] == "smtp")
    assert statuses == ["bounced", "deferred", "sent", "sent"]
    sent = next(r for r in records if r.get("status") == "sent")
    assert sent["queue_id"] and sent["relay"].startswith("127.0.0.1[") and sent["dsn"] == "2.0.0"
    assert "queued as" in sent["reply"]


def test_route_command(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text("""
        [node]
        spool = "spool"
        [[listen]]
        address = "127.0.0.1:2525"
        [relay]
        default = "tokyo"
        [nexthop.tokyo]
        host = "[10.20.8.37]"
        port = 3535
        tls = "none"
        [nexthop.ses]
        host = "email-smtp.us-east-1.amazonaws.com"
        port = 587
        tls = "verify"
        [[route]]
        domains = [".example.cn", "example.cn"]
        hop = "direct"
        [[route]]
        senders = ["@billing.example.com"]
        hop = "ses"
    """.replace("\n        ", "\n"))
    out = mailhop("route", "-c", str(cfg), "user@mail.example.cn")
    assert out.returncode == 0
    assert "-> direct (MX of the recipient domain, port 25" in out.stdout
    assert "route[0] matches domains .example.cn" in out.stdout
    out = mailhop("route", "-c", str(cfg), "user@gmail.com", "--sender", "x@billing.example.com")
    assert "-> ses (email-smtp.us-east-1.amazonaws.com:587, tls=verify)" in out.stdout
    out = mailhop("route", "-c", str(cfg), "user@gmail.com")
    assert "-> tokyo ([10.20.8.37]:3535, tls=none)" in out.stdout
    assert "[relay] default" in out.stdout


def test_lifetime_expiry_bounces(tmp_path: Path) -> None:
    dead = free_port()
    node = MailhopNode(tmp_path / "node", relay=f"[127.0.0.1]:{dead}",
                       queue='lifetime = "2s"\nmin_backoff = "1s"\nmax_backoff = "1s"\n').start()
    try:
        qid = send(node.port, "app@example.com", ["user@example.com"])
        wait_for(lambda: f"{qid}: from=<app@example.com>, status=expired, returned to sender"
                 in node.log(), timeout=30, what="expiry")
        wait_for(lambda: re.search(rf"{qid}: sender non-delivery notification: [0-9A-F]+",
                                   node.log()), timeout=10, what="the bounce")
    finally:
        node.stop()


def test_smtputf8_to_a_hop_without_it_bounces(tmp_path: Path) -> None:
    require_peer("postfix")
    final = PostfixInstance(tmp_path / "final").final_hop()
    final.postconf("smtputf8_enable = no")
    final.start()
    node = MailhopNode(tmp_path / "node", relay=f"[127.0.0.1]:{final.port}").start()
    try:
        with smtplib.SMTP("127.0.0.1", node.port) as s:
            s.ehlo("x")
            assert s.mail("sender@example.com", ["SMTPUTF8"])[0] == 250
            assert s.rcpt("用户@example.com")[0] == 250
            assert s.data(b"Subject: utf8\r\n\r\nx\r\n")[0] == 250
        line = wait_for(lambda: re.search(r"to=<用户@example\.com>, .*status=bounced \((.*)\)",
                                          node.log()), timeout=20).group(0)
        assert "dsn=5.6.7" in line and "SMTPUTF8 is required" in line
        # the DSN itself is plain ASCII mail to an ASCII sender: it can go through
        dsn = wait_for(lambda: final.delivered(), timeout=20, what="the DSN")[0]
        assert b"Status: 5.6.7" in dsn
    finally:
        node.stop()
        final.stop()


def test_connection_reuse_and_reconnect_after_server_idle_close(tmp_path: Path) -> None:
    require_peer("postfix")
    final = PostfixInstance(tmp_path / "final").final_hop()
    final.postconf("smtpd_timeout = 2s")
    final.start()
    node = MailhopNode(tmp_path / "node", relay=f"[127.0.0.1]:{final.port}",
                       hop='tls = "none"\nmax_connections = 1\n',
                       extra='[delivery]\nidle_time = "30s"\n').start()
    try:
        for _ in range(5):
            send(node.port, "app@example.com", ["user@example.com"])
        wait_for(lambda: len(final.delivered()) == 5, timeout=20, what="five deliveries")
        log = final.log()  # one connection for five messages (the other is start()'s probe)
        probes = log.count("commands=0/0")
        assert len(re.findall(r"postfix/smtpd\[\d+\]: connect from", log)) - probes == 1
        time.sleep(3.5)  # Postfix drops our idle connection after 2 s
        send(node.port, "app@example.com", ["user@example.com"])
        wait_for(lambda: len(final.delivered()) == 6, timeout=20, what="delivery after reconnect")
        assert "status=deferred" not in node.log()
    finally:
        node.stop()
        final.stop()
