"""Prometheus metrics and /healthz, scraped during a real chain run."""

from __future__ import annotations

import re
import smtplib
import urllib.error
import urllib.request
from pathlib import Path

from support import MailhopNode, free_port, wait_for


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$" if labels else \
        rf"^{re.escape(name)} (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_add_up_and_health_follows_the_next_hop(tmp_path: Path) -> None:
    egress = MailhopNode(tmp_path / "egress", relay=None,
                         extra="[queue]\nhold_delivery = true\n").start()
    mport = free_port()
    ingress = MailhopNode(tmp_path / "ingress", networks=("127.0.0.1/32",),
                          relay=f"[127.0.0.1]:{egress.port}",
                          extra=f'[metrics]\naddress = "127.0.0.1:{mport}"\n').start()
    name = f"127.0.0.1:{ingress.port}"
    try:
        for i in range(5):
            with smtplib.SMTP(ingress.host, ingress.port) as s:
                s.sendmail("app@example.com", [f"u{i}@example.com"], b"Subject: m\r\n\r\nx\r\n")
        with smtplib.SMTP(ingress.host, ingress.port, source_address=("127.0.0.2", 0)) as s:
            s.ehlo("x")
            s.mail("spam@example.net")
            assert s.rcpt("victim@example.com")[0] == 554
        wait_for(lambda: value(scrape(mport)[1], "mailhop_deliveries_total", hop="next",
                               status="sent") == 5, timeout=20, what="five deliveries")
        text = scrape(mport)[1]
        assert value(text, "mailhop_messages_received_total", listener=name) == 5
        assert value(text, "mailhop_rejects_total", listener=name, stage="RCPT") == 1
        # six clients, plus the readiness probe of MailhopNode.start()
        assert value(text, "mailhop_connections_total", listener=name) == 7
        assert value(text, "mailhop_delivery_delay_seconds_count", hop="next") == 5
        # every 250 waited for a commit; results may share a group commit with them
        assert value(text, "mailhop_spool_commit_seconds_count") >= 5
        assert value(text, "mailhop_hop_up", hop="next") == 1
        wait_for(lambda: value(scrape(mport)[1], "mailhop_queue_messages") == 0, timeout=10)
        assert scrape(mport, "/healthz") == (200, "ok\n")
        # the next hop goes away: mail is deferred, the hop is down, health says why
        egress.stop()
        with smtplib.SMTP(ingress.host, ingress.port) as s:
            s.sendmail("app@example.com", ["late@example.com"], b"Subject: m\r\n\r\nx\r\n")
        wait_for(lambda: scrape(mport, "/healthz")[0] == 503, timeout=20, what="503")
        _, body = scrape(mport, "/healthz")
        assert "no usable next hop: next: delivery temporarily suspended" in body
        text = scrape(mport)[1]
        assert value(text, "mailhop_hop_up", hop="next") == 0
        assert value(text, "mailhop_deliveries_total", hop="next", status="deferred") >= 1
        assert value(text, "mailhop_queue_recipients", state="deferred") == 1
        assert value(text, "mailhop_queue_oldest_message_age_seconds") > 0
    finally:
        ingress.stop()
        egress.stop()
