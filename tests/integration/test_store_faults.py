"""A spool that cannot write answers 4xx, never 250 (RFC 5321 6.1)."""

from __future__ import annotations

import asyncio
import os
import smtplib
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from support import IN_CI, MailhopNode, PostfixInstance, mailhop, wait_for

from mailhop.config import ListenConfig, LogConfig
from mailhop.observe.maillog import MailLog
from mailhop.smtpd.listener import Listener
from mailhop.spool.store import Spool

MSG = b"Subject: t\r\n\r\n" + (b"x" * 76 + b"\r\n") * 4000  # ~300 KiB


@pytest.fixture
def small_fs(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        if IN_CI:
            pytest.fail(f"cannot mount a small tmpfs: {result.stderr}")
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    size = st.f_bavail * st.f_frsize - leave
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, size))
    return filler


def send(node: MailhopNode, data: bytes = MSG) -> tuple[int, bytes]:
    with smtplib.SMTP(node.host, node.port) as s:
        s.ehlo("x")
        code, text = s.mail("a@example.org")
        if code != 250:
            return code, text
        s.rcpt("b@example.com")
        return s.data(data)


def test_disk_full_gives_452_and_recovers(small_fs: Path, tmp_path: Path) -> None:
    node = MailhopNode(tmp_path / "node", spool=small_fs / "spool", min_free="1").start()
    try:
        assert send(node, b"Subject: small\r\n\r\nfits\r\n")[0] == 250
        filler = fill(small_fs, leave=64 * 1024)
        code, text = send(node)  # 300 KiB cannot fit in 64 KiB
        assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
        assert len(node.queue()) == 1  # nothing half-written became a message
        filler.unlink()
        code, _ = send(node)
        assert code == 250
        assert len(node.queue()) == 2
    finally:
        node.stop()


def test_nearly_full_disk_refuses_new_mail_and_drains_old(small_fs: Path,
                                                          tmp_path: Path) -> None:
    final = PostfixInstance(tmp_path / "final").final_hop()
    node = MailhopNode(tmp_path / "node", spool=small_fs / "spool", min_free="2M",
                       relay=f"[127.0.0.1]:{final.port}",
                       queue='min_backoff = "1h"\nmax_backoff = "2h"\n').start()
    try:
        for _ in range(3):  # queued while the next hop is down
            assert send(node, b"Subject: waiting\r\n\r\nx\r\n")[0] == 250
        wait_for(lambda: node.log().count("status=deferred") >= 3, timeout=20)
        filler = fill(small_fs, leave=1 << 20)
        time.sleep(1.2)  # the free-space check is cached for a second
        code, text = send(node)
        assert (code, text[:5]) == (452, b"4.3.1")  # new mail: try later, never 250
        final.start()
        assert mailhop("queue", "flush", "--spool", str(node.spool)).returncode == 0
        wait_for(lambda: len(final.delivered()) == 3, timeout=30, what="the old mail drains")
        wait_for(lambda: node.queue() == [], timeout=10, what="an empty queue")
        filler.unlink()
        time.sleep(1.2)
        assert send(node, b"Subject: space again\r\n\r\ny\r\n")[0] == 250
    finally:
        node.stop()
        final.stop()


async def test_broken_store_gives_451(tmp_path: Path) -> None:
    """An I/O error inside the commit must surface as 451 4.3.0 to the client."""
    spool = Spool(tmp_path / "spool")
    spool.open()

    def broken(*args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    spool._insert_rows = broken  # type: ignore[method-assign]
    cfg = ListenConfig(name="t", host="127.0.0.1", port=0, networks=())
    log = MailLog(LogConfig(maillog=str(tmp_path / "maillog")))
    listener = Listener(cfg, "mx.test", spool, log)
    listener.policy.trusted = lambda addr: True  # type: ignore[method-assign]
    await listener.start()
    try:
        def client() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", listener.bound_port) as s:
                s.ehlo("x")
                s.mail("a@example.org")
                s.rcpt("b@example.com")
                return s.data(b"Subject: t\r\n\r\nx\r\n")

        code, text = await asyncio.to_thread(client)
        assert (code, text[:5]) == (451, b"4.3.0")
        assert "queue file write error" in (tmp_path / "maillog").read_text()
    finally:
        listener.stop_accepting()
        await listener.drain(1)
        spool.close()
