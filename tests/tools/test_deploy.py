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


def test_dockerfile_shape() -> None:
    """No Docker engine on these machines: check the image's promises statically."""
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    final = lines[max(i for i, ln in enumerate(lines) if ln.startswith("FROM "))]
    assert final.startswith("FROM python:3.11-slim")  # slim base for the final stage
    assert "USER mailhop" in lines  # not root
    assert any(ln.startswith("VOLUME") and "/var/spool/mailhop" in ln for ln in lines)
    assert 'CMD ["serve", "-c", "/etc/mailhop/mailhop.toml"]' in lines
    assert lines.index("USER mailhop") > max(i for i, ln in enumerate(lines)
                                             if ln.startswith("RUN "))
    copied = [ln for ln in lines if ln.startswith(("COPY", "ADD"))]
    assert not any("secret" in ln or ".key" in ln for ln in copied)  # no secrets baked in
    for ln in copied:  # everything copied from the build context exists
        if "--from" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), src
