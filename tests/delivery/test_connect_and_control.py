"""Happy eyeballs to a half-broken dual-stack host; queue control on running and stopped nodes."""

from __future__ import annotations

import re
import smtplib
import socket
import time
from pathlib import Path

import pytest
from support import MailhopNode, PostfixInstance, mailhop, wait_for

MSG = b"Subject: x\r\nMessage-ID: <x@test>\r\n\r\nhello\r\n"


def submit(node: MailhopNode, rcpt: str = "user@example.com") -> str:
    with smtplib.SMTP(node.host, node.port) as s:
        s.ehlo("x")
        s.mail("app@example.com")
        s.rcpt(rcpt)
        code, text = s.data(MSG)
    assert code == 250
    return text.split()[-1].decode()


@pytest.fixture
def blackhole_v6():
    """A [::1] port whose accept queue is full: connecting there hangs, like a dead route."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on loopback")
    socks = []

    def make(port: int) -> None:
        srv = socket.socket(socket.AF_INET6)
        srv.bind(("::1", port))
        srv.listen(0)
        filler = socket.socket(socket.AF_INET6)
        filler.connect(("::1", port))
        socks.extend([srv, filler])
        probe = socket.socket(socket.AF_INET6)
        probe.settimeout(0.5)
        with pytest.raises(OSError):
            probe.connect(("::1", port))  # proves that the address really hangs
        probe.close()

    yield make
    for s in socks:
        s.close()


def test_happy_eyeballs_skips_a_hanging_ipv6_address(tmp_path: Path, blackhole_v6) -> None:
    upstream = MailhopNode(tmp_path / "up", relay=None,
                           extra="[queue]\nhold_delivery = true\n").start()
    blackhole_v6(upstream.port)
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 dual.test\n127.0.0.1 dual.test\n")
    node = MailhopNode(tmp_path / "node", relay=f"[dual.test]:{upstream.port}",
                       hop='tls = "none"\n',
                       extra=f'[resolver]\nhosts = "{hosts}"\n[delivery]\n'
                             f'connect_timeout = "30s"\n').start()
    try:
        started = time.monotonic()
        qid = submit(node)
        wait_for(lambda: f"{qid}: removed" in node.log(), timeout=15)
        elapsed = time.monotonic() - started
        assert elapsed < 5, f"waited {elapsed:.1f}s: the IPv6 attempt was not raced"
        assert re.search(rf"{qid}: to=<user@example\.com>, relay=dual\.test\[127\.0\.0\.1\]:"
                         rf"{upstream.port}, .*status=sent", node.log())
        assert len(upstream.queue()) == 1
    finally:
        node.stop()
        upstream.stop()


def queue_ids(node: MailhopNode) -> dict[str, dict]:
    return {e["queue_id"]: e for e in node.queue()}


def test_queue_control_on_running_and_stopped_node(tmp_path: Path) -> None:
    final = PostfixInstance(tmp_path / "final").final_hop()
    node = MailhopNode(tmp_path / "node", relay=f"[127.0.0.1]:{final.port}",
                       queue='min_backoff = "1h"\nmax_backoff = "2h"\nrun_delay = "1h"\n').start()
    spool = str(node.spool)
    try:
        keep, drop = submit(node), submit(node)
        wait_for(lambda: node.log().count("status=deferred") >= 2, timeout=20)
        final.start()
        # hold one, delete the other, on the running node
        out = mailhop("queue", "hold", "--spool", spool, keep)
        assert out.returncode == 0 and "via running node" in out.stdout, out.stderr
        assert mailhop("queue", "delete", "--spool", spool, drop).returncode == 0
        assert list(queue_ids(node)) == [keep] and queue_ids(node)[keep]["held"] is True
        # flush does not touch held mail
        assert mailhop("queue", "flush", "--spool", spool).returncode == 0
        time.sleep(1.5)
        assert final.delivered() == []
        # stopped node: changes go straight to the spool
        node.stop()
        out = mailhop("queue", "release", "--spool", spool, keep)
        assert out.returncode == 0 and "node not running" in out.stdout
        assert queue_ids(node)[keep]["held"] is False
        assert mailhop("queue", "hold", "--spool", spool, "NOSUCHID").returncode == 1
        node.start()  # released mail is due now: delivered at start
        wait_for(final.delivered, timeout=20, what="delivery after release")
        wait_for(lambda: f"{keep}: removed" in node.log(), timeout=10)
        assert f"{drop}: removed" in node.log()  # the delete was logged too
    finally:
        node.stop()
        final.stop()


def test_flush_retries_deferred_now(tmp_path: Path) -> None:
    final = PostfixInstance(tmp_path / "final").final_hop()
    node = MailhopNode(tmp_path / "node", relay=f"[127.0.0.1]:{final.port}",
                       queue='min_backoff = "1h"\nmax_backoff = "2h"\nrun_delay = "1h"\n').start()
    try:
        qid = submit(node)
        wait_for(lambda: "status=deferred" in node.log(), timeout=20)
        final.start()
        time.sleep(1.0)
        assert final.delivered() == []  # backoff is an hour: nothing happens by itself
        assert mailhop("queue", "flush", "--spool", str(node.spool)).returncode == 0
        wait_for(final.delivered, timeout=20, what="delivery after flush")
        wait_for(lambda: f"{qid}: removed" in node.log(), timeout=10)
    finally:
        node.stop()
        final.stop()
