"""Deployment files: the systemd unit verifies, the compose configs are valid node configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import mailhop, require_peer

ROOT = Path(__file__).resolve().parents[2]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    require_peer("systemd-analyze")
    exe = shutil.which("mailhop") or str(Path(sys.executable).with_name("mailhop"))
    unit = (ROOT / "deploy/systemd/mailhop@.service").read_text()
    assert "User=mailhop" in unit and "NoNewPrivileges=yes" in unit
    good = tmp_path / "mailhop@ingress.service"
    good.write_text(unit.replace("/usr/local/bin/mailhop", exe))
    result = subprocess.run(["systemd-analyze", "verify", str(good)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    broken = unit.replace("[Service]", "[Service]\nNoSuchSetting=1").replace(
        "/usr/local/bin/mailhop", exe)
    (tmp_path / "mailhop@broken.service").write_text(broken)
    result = subprocess.run(["systemd-analyze", "verify",
                             str(tmp_path / "mailhop@broken.service")],
                            capture_output=True, text=True)
    assert "NoSuchSetting" in result.stderr  # the check really reads the file


@pytest.mark.skipif(os.geteuid() != 0, reason="make-secrets.py chowns to the mailhop uid")
def test_compose_configs_are_valid(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    subprocess.run([sys.executable, str(ROOT / "deploy/compose/make-secrets.py"), str(secrets)],
                   check=True)
    assert (secrets / "ses.secret").stat().st_mode & 0o777 == 0o600
    for name in ("ingress", "egress", "ses"):
        text = (ROOT / f"deploy/compose/{name}.toml").read_text()
        text = text.replace("/secrets", str(secrets)).replace("/var/spool/mailhop",
                                                              str(tmp_path / name))
        (tmp_path / f"{name}.toml").write_text(text)
        result = mailhop("check-config", "-c", str(tmp_path / f"{name}.toml"))
        assert result.returncode == 0, result.stderr
    compose = (ROOT / "deploy/compose.yaml").read_text()
    for path in ("compose/make-secrets.py", "compose/ses.toml", "compose/egress.toml",
                 "compose/ingress.toml"):
        assert path.split("/")[1] in compose
        assert (ROOT / "deploy" / path).exists()
