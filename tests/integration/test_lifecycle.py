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


def test_queue_check_and_repair(tmp_path: Path) -> None:
    import sqlite3

    node = MailhopNode(tmp_path / "node", relay=None,
                       extra="[queue]\nhold_delivery = true\n").start()
    big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 1200  # > 1 MiB: a body file
    ids = []
    for data in (b"Subject: small\r\n\r\nx\r\n", big, b"Subject: third\r\n\r\ny\r\n"):
        with smtplib.SMTP(node.host, node.port) as s:
            s.ehlo("x")
            s.mail("a@example.com")
            s.rcpt("b@example.com")
            ids.append(s.data(data)[1].split()[-1].decode())
    spool = str(node.spool)
    assert mailhop("queue", "check", "--spool", spool).returncode == 0  # fine, while running
    node.stop()
    # break it: lose a body file, leave an orphan file, orphan a message's recipients
    (node.spool / "bodies" / ids[1]).unlink()
    (node.spool / "bodies" / "STRAY").write_bytes(b"junk")
    db = sqlite3.connect(node.spool / "spool.db")
    db.execute("DELETE FROM recipient WHERE message = ?", (ids[2],))
    db.commit()
    db.close()
    result = mailhop("queue", "check", "--spool", spool)
    assert result.returncode == 1
    assert f"{ids[1]}: missing body" in result.stdout
    assert f"{ids[2]}: no recipients" in result.stdout
    assert "STRAY: orphan body" in result.stdout
    result = mailhop("queue", "check", "--spool", spool, "--repair")
    assert result.returncode == 0, result.stderr
    assert (node.spool / "corrupt" / f"{ids[1]}.json").exists()
    assert not (node.spool / "bodies" / "STRAY").exists()
    assert mailhop("queue", "check", "--spool", spool).returncode == 0
    assert [e["queue_id"] for e in node.queue()] == [ids[0]]  # the healthy one is untouched
