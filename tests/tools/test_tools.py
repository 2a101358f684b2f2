"""Operator tools: the README's demo command, probe, local submission, trace, seed configs."""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import socket
import subprocess
from pathlib import Path

import pytest
from support import MailhopNode, auth_node, mailhop, wait_for

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Pr0be-Secret"


def readme_command(index: int) -> str:
    """The quick start's commands, exactly as the README gives them."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and
                not line.lstrip().startswith("#")]
    assert len(commands) == 2, commands
    return commands[index]


def test_readme_main_command_runs_the_demo(tmp_path: Path) -> None:
    command = readme_command(0)
    assert "mailhop demo" in command
    checkout = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        src = ROOT / name
        if src.is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, checkout / name)
    result = subprocess.run(["bash", "-c", command], cwd=checkout, capture_output=True,
                            text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    messages = re.findall(r"^message \d+ ", result.stdout, re.M)
    assert len(messages) >= 1
    for hop in (r"1 ingress \(Shanghai\)\s+[0-9A-F]+\s+→ .* sent",
                r"2 egress \(Tokyo\)\s+[0-9A-F]+\s+→ email-smtp\.demo\.test\[127\.0\.0\.1\].* sent",
                r"3 SES stand-in\s+[0-9A-F]+\s+accepted"):
        assert len(re.findall(hop, result.stdout)) == len(messages), (hop, result.stdout)
    assert re.search(r"OK: (\d+)/\1 messages went ingress → egress → SES stand-in",
                     result.stdout)


@pytest.fixture
def smarthost(tmp_path: Path):
    node = auth_node(tmp_path / "smarthost", "probe-user", PASSWORD, auth="required",
                     names=("smtp.probe.test",), networks=(), relay=None,
                     extra="[queue]\nhold_delivery = true\n")
    yield node
    node.stop()


def test_probe_starttls_and_auth(tmp_path: Path, smarthost: MailhopNode) -> None:
    creds = tmp_path / "creds"
    creds.write_text(f"probe-user:{PASSWORD}\n")
    creds.chmod(0o600)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 smtp.probe.test\n")
    result = mailhop("probe", f"[smtp.probe.test]:{smarthost.port}", "--hosts", str(hosts),
                     "--ca-file", str(smarthost.certs.ca), "--credentials", str(creds))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "connect   ok" in out and "greeting  220 " in out
    assert re.search(r"STARTTLS  TLSv1\.[23] ", out)
    assert "verify    ok" in out and "AUTH      ok (user probe-user)" in out
    assert "subject" in out and "expires" in out
    assert PASSWORD not in out
    assert "verdict: working path exists: IPv4 works" in out
    # JSON, and a wrong CA: verification fails, so no working path
    result = mailhop("probe", f"[smtp.probe.test]:{smarthost.port}", "--hosts", str(hosts),
                     "--json")
    assert result.returncode == 1
    [report] = json.loads(result.stdout)
    assert report["addresses"][0]["tls"]["verification"].startswith("FAILED")
    assert report["addresses"][0]["tls"]["protocol"].startswith("TLSv1")


def test_probe_closed_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mailhop("probe", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert "connect   failed: Connection refused" in result.stdout
    assert "verdict: NO working path: IPv4 fails (Connection refused)" in result.stdout


def test_probe_broken_ipv6_working_ipv4(tmp_path: Path, smarthost: MailhopNode) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on loopback")
    srv = socket.socket(socket.AF_INET6)  # [::1] on the same port: accept queue full, hangs
    srv.bind(("::1", smarthost.port))
    srv.listen(0)
    filler = socket.create_connection(("::1", smarthost.port))
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 dual.probe.test\n127.0.0.1 dual.probe.test\n")
    try:
        result = mailhop("probe", f"dual.probe.test:{smarthost.port}", "--hosts", str(hosts),
                         "--timeout", "2", "--tls", "encrypt")
    finally:
        filler.close()
        srv.close()
    out = result.stdout
    assert result.returncode == 0, out
    assert re.search(r"IPv6 dual\.probe\.test\[::1\]:\d+\n    connect   failed: Connection "
                     r"timed out", out)
    assert re.search(r"IPv4 dual\.probe\.test\[127\.0\.0\.1\]:\d+\n    connect   ok", out)
    assert "IPv6 fails (Connection timed out); IPv4 works" in out


@pytest.fixture
def node(tmp_path: Path):
    n = MailhopNode(tmp_path / "node", relay=None, extra="[queue]\nhold_delivery = true\n")
    n.start()
    yield n
    n.stop()


def test_sendmail_t_and_send(node: MailhopNode) -> None:
    server = f"127.0.0.1:{node.port}"
    message = ("From: App <app@example.com>\nTo: a@example.com, B <b@example.com>\n"
               "Cc: c@example.com\nBcc: hidden@example.com\nSubject: via sendmail\n\n"
               "line one\n.\nafter a lone dot (-i keeps it)\n")
    result = mailhop("sendmail", "-t", "-i", "-f", "app@example.com", "--server", server,
                     "-v", stdin=message)
    assert result.returncode == 0, result.stderr
    qid = re.search(r"queued as ([0-9A-F]+)", result.stdout).group(1)
    result = mailhop("send", "-s", "日本語の件名", "-r", "ops@example.com", "x@example.net",
                     "y@example.net", "--server", server, stdin="body from mail -s\n")
    assert result.returncode == 0, result.stderr
    entries = {e["queue_id"]: e for e in node.queue()}
    assert sorted(r["address"] for r in entries[qid]["recipients"]) == [
        "a@example.com", "b@example.com", "c@example.com", "hidden@example.com"]
    shown = mailhop("queue", "show", "--spool", str(node.spool), qid, "--body").stdout
    assert "Bcc" not in shown and "hidden@example.com" not in shown.split("\n\n", 1)[1]
    assert "after a lone dot (-i keeps it)" in shown
    assert "Message-ID: <" in shown and "Date: " in shown
    other = next(e for q, e in entries.items() if q != qid)
    assert other["sender"] == "ops@example.com"
    assert [r["address"] for r in other["recipients"]] == ["x@example.net", "y@example.net"]
    body = mailhop("queue", "show", "--spool", str(node.spool), other["queue_id"],
                   "--body").stdout
    assert "Subject: =?utf-8?" in body and "body from mail -s" in body


def test_sendmail_without_i_stops_at_dot(node: MailhopNode) -> None:
    result = mailhop("sendmail", "--server", f"127.0.0.1:{node.port}", "-v", "to@example.com",
                     stdin="Subject: dot\n\nkept\n.\ndropped\n")
    assert result.returncode == 0
    qid = result.stdout.split()[2]
    shown = mailhop("queue", "show", "--spool", str(node.spool), qid, "--body").stdout
    assert "kept" in shown and "dropped" not in shown


def test_submission_errors(node: MailhopNode) -> None:
    server = f"127.0.0.1:{node.port}"
    result = mailhop("sendmail", "-t", "--server", server, stdin="Subject: none\n\nx\n")
    assert result.returncode == 64 and "no recipients" in result.stderr
    result = mailhop("send", "-s", "x", "not an address", "--server", server, stdin="x\n")
    assert result.returncode == 64 and "invalid recipient address" in result.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    result = mailhop("send", "-s", "x", "a@example.com", "--server", f"127.0.0.1:{closed}",
                     stdin="x\n")
    assert result.returncode == 75
    assert "Connection refused" in result.stderr and "is the node running?" in result.stderr
    assert "Traceback" not in result.stderr


def test_sendmail_rejected_recipient(tmp_path: Path) -> None:
    n = MailhopNode(tmp_path / "n", networks=("127.0.0.9/32",), relay=None,
                    extra="[queue]\nhold_delivery = true\n").start()
    try:
        result = mailhop("send", "-s", "x", "a@example.com", "--server",
                         f"127.0.0.1:{n.port}", stdin="x\n")
        assert result.returncode == 69
        assert "554 5.7.1" in result.stderr and "Relay access denied" in result.stderr
    finally:
        n.stop()


def test_trace_two_hops_from_two_logs(tmp_path: Path) -> None:
    egress = MailhopNode(tmp_path / "egress", name="egress", relay=None,
                         extra="[queue]\nhold_delivery = true\n").start()
    ingress = MailhopNode(tmp_path / "ingress", name="ingress",
                          relay=f"[127.0.0.1]:{egress.port}").start()
    try:
        with smtplib.SMTP("127.0.0.1", ingress.port) as s:
            s.sendmail("app@example.com", ["user@example.net"],
                       b"Subject: trace me\r\nMessage-ID: <trace-1@app.test>\r\n\r\nhi\r\n")
        m = wait_for(lambda: re.search(r"([0-9A-F]+): to=<user@example\.net>.*status=sent "
                                       r"\(250 2\.0\.0 Ok: queued as ([0-9A-F]+)\)",
                                       ingress.log()), timeout=20)
        first, second = m.group(1), m.group(2)
    finally:
        ingress.stop()
        egress.stop()
    for wanted in (first, "<trace-1@app.test>"):
        result = mailhop("trace", wanted, "--log", str(ingress.maillog), "--log",
                         str(egress.maillog))
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert f"hop 1: ingress queue ID {first}" in out
        assert f"hop 2: egress queue ID {second}" in out
        assert f"status=sent -> {second}" in out
        assert "received" in out and "from unknown[127.0.0.1]" in out
    result = mailhop("trace", first, "--log", str(tmp_path), "--json")  # a directory works
    data = json.loads(result.stdout)
    assert [h["queue_id"] for h in data["hops"]] == [first, second]
    assert data["hops"][0]["deliveries"][0]["next_id"] == second
    result = mailhop("trace", "NOSUCH", "--log", str(ingress.maillog))
    assert result.returncode == 1 and "not found" in result.stderr


def test_seed_examples_pass_check_config(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    shutil.copytree(ROOT / "examples" / "seed", seed)
    (seed / "ses.secret.example").chmod(0o600)  # git does not keep 0600; operators must
    for name in ("ingress.toml", "egress.toml"):
        result = mailhop("check-config", "-c", str(seed / name))
        assert result.returncode == 0, result.stderr
    out = mailhop("check-config", "-c", str(seed / "egress.toml")).stdout
    assert "ses -> [email-smtp.us-east-1.amazonaws.com]:587" in out
    assert "tokyo -> [10.20.8.37]:3535" in mailhop("check-config", "-c",
                                                    str(seed / "ingress.toml")).stdout
