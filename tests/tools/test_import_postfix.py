"""mailhop import-postfix on the seed post's exact Postfix settings, both nodes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from support import mailhop

SEED_COMMON = """\
# 以下をコメントアウトし変更
#inet_interfaces = localhost
inet_interfaces = all
mydestination = localhost
mynetworks = 172.16.0.0/12, 10.0.0.0/8, 127.0.0.0/8
smtp_sasl_auth_enable = yes
smtp_sasl_security_options = noanonymous
smtp_sasl_password_maps = hash:{dir}/sasl_passwd
smtp_use_tls = yes
smtp_tls_security_level = may
smtp_tls_note_starttls_offer = yes
smtp_tls_CAfile = /etc/ssl/certs/ca-bundle.crt
"""
MASTER = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{port}      inet  n       -       n       -       -       smtpd
#smtp      inet  n       -       n       -       -       smtpd
pickup    unix  n       -       y       60      1       pickup
cleanup   unix  n       -       y       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
smtp      unix  -       -       y       -       -       smtp
"""


def seed_dir(tmp_path: Path, port: int, relayhost: str, sasl: str) -> Path:
    d = tmp_path / f"postfix-{port}"
    d.mkdir()
    (d / "main.cf").write_text(SEED_COMMON.format(dir=d) + f"relayhost = {relayhost}\n"
                               "message_size_limit = 20480000\nmaximal_queue_lifetime = 3\n"
                               "content_filter = smtp-amavis:[127.0.0.1]:10024\n")
    (d / "master.cf").write_text(MASTER.format(port=port))
    (d / "sasl_passwd").write_text(sasl)
    (d / "sasl_passwd").chmod(0o600)
    return d


@pytest.mark.parametrize(("port", "relayhost", "sasl", "host", "next_port"), [
    (2525, "[10.20.8.37]:3535", "", "[10.20.8.37]", 3535),  # Shanghai: empty sasl_passwd
    (3535, "[email-smtp.us-east-1.amazonaws.com]:587",
     "[email-smtp.us-east-1.amazonaws.com]:587 AKIAUSER:smtp-password\n",
     "[email-smtp.us-east-1.amazonaws.com]", 587),  # Tokyo
])
def test_import_seed_node(tmp_path: Path, port: int, relayhost: str, sasl: str, host: str,
                          next_port: int) -> None:
    d = seed_dir(tmp_path, port, relayhost, sasl)
    out = tmp_path / "node.toml"
    result = mailhop("import-postfix", str(d), "-o", str(out))
    assert result.returncode == 0, result.stderr
    cfg = tomllib.loads(out.read_text())
    assert cfg["listen"][0]["address"] == f"0.0.0.0:{port}"
    assert cfg["listen"][0]["networks"] == ["172.16.0.0/12", "10.0.0.0/8", "127.0.0.0/8"]
    assert cfg["listen"][0]["max_message_size"] == 20480000
    hop = cfg["nexthop"]["relayhost"]
    assert (hop["host"], hop["port"], hop["tls"]) == (host, next_port, "may")
    assert hop["credentials"] == str(d / "sasl_passwd")
    assert cfg["relay"]["default"] == "relayhost"
    assert cfg["queue"]["lifetime"] == "3d"  # Postfix's bare number here means days
    text = out.read_text()
    assert "# main.cf: relayhost" in text and "mynetworks" in text
    assert re.search(r"#   main\.cf: content_filter = smtp-amavis", text)  # reported, not lost
    if not sasl:
        assert f"{d / 'sasl_passwd'} has no line for {relayhost}" in result.stderr
    else:  # the generated file is a valid node config
        check = mailhop("check-config", "-c", str(out))
        assert check.returncode == 0, check.stderr


def test_import_needs_main_cf(tmp_path: Path) -> None:
    result = mailhop("import-postfix", str(tmp_path))
    assert result.returncode == 2 and "no main.cf" in result.stderr
