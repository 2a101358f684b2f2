"""SIGHUP reloads without dropping queued mail or sessions; a bad reload keeps the old config."""

from __future__ import annotations

import re
import signal
import smtplib
from pathlib import Path

from support import MailhopNode, PostfixInstance, free_port, mailhop, wait_for


def test_sighup_reload(tmp_path: Path) -> None:
    final = PostfixInstance(tmp_path / "final").final_hop()
    dead = free_port()
    node = MailhopNode(tmp_path / "node", networks=("127.0.0.1/32",),
                       relay=f"[127.0.0.1]:{dead}",
                       queue='min_backoff = "1h"\nmax_backoff = "2h"\n').start()
    try:
        with smtplib.SMTP(node.host, node.port) as s:
            s.sendmail("app@example.com", ["user@example.com"], b"Subject: queued\r\n\r\nx\r\n")
        wait_for(lambda: "status=deferred" in node.log(), timeout=20)
        # an established session, in the middle of a transaction, across the reload
        held = smtplib.SMTP(node.host, node.port)
        held.ehlo("x")
        held.mail("app@example.com")
        held.rcpt("user@example.com")
        with smtplib.SMTP(node.host, node.port, source_address=("127.0.0.2", 0)) as s:
            s.ehlo("x")
            s.mail("a@example.com")
            assert s.rcpt("user@example.com")[0] == 554  # not yet allowed to relay
        # 1. a broken config is refused and the node keeps running the old one
        good = node.config.read_text()
        node.config.write_text(good + "\nbogus = true\n")
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload failed, keeping the running configuration" in node.log(),
                 timeout=10)
        assert "bogus: unknown key" in node.log()
        # 2. a good one: new networks, and the next hop is now the live Postfix
        final.start()
        node.config.write_text(good.replace('networks = ["127.0.0.1/32"]',
                                            'networks = ["127.0.0.1/32", "127.0.0.2/32"]')
                               .replace(f"port = {dead}", f"port = {final.port}"))
        node.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload -- configuration" in node.log(), timeout=10)
        code, _ = held.data(b"Subject: across the reload\r\n\r\ny\r\n")
        assert code == 250
        held.quit()
        with smtplib.SMTP(node.host, node.port, source_address=("127.0.0.2", 0)) as s:
            s.sendmail("a@example.com", ["user@example.com"], b"Subject: now allowed\r\n\r\nz\r\n")
        # queued mail survived the reload; a flush sends it to the new next hop now
        assert mailhop("queue", "flush", "--spool", str(node.spool)).returncode == 0
        wait_for(lambda: len(final.delivered()) == 3, timeout=30, what="three deliveries")
        assert node.proc.poll() is None
        assert re.search(rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{final.port}, .*status=sent",
                         node.log())
    finally:
        node.stop()
        final.stop()
