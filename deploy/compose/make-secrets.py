"""Mint the compose demo's secrets: a CA, the SES stand-in's certificate, its AUTH user and
the egress's 0600 credentials file (readable by the mailhop user, uid 10025)."""

import os
import secrets
import sys
from pathlib import Path

import trustme

from mailhop.smtpd.auth import set_password

out = Path(sys.argv[1])
ca = trustme.CA()
ca.cert_pem.write_to_path(str(out / "ca.pem"))
cert = ca.issue_cert("ses")
cert.cert_chain_pems[0].write_to_path(str(out / "ses.crt"))
cert.private_key_pem.write_to_path(str(out / "ses.key"))
password = secrets.token_urlsafe(16)
set_password(out / "users", "ses-user", password)
(out / "ses.secret").write_text(f"ses-user:{password}\n")
for name in ("ses.key", "users", "ses.secret"):
    os.chown(out / name, 10025, 10025)
    os.chmod(out / name, 0o600)
