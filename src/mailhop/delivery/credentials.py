"""SASL credentials for a next hop, from a file only its owner can read.

Two formats, so seed users can keep what they have:

* ``user:password`` on one line (mailhop's own), or
* Postfix ``sasl_passwd`` lines: ``[host]:port user:password`` (also ``host``
  or ``host:port``); the line for the hop's ``[host]:port`` wins.

The password is kept in a :class:`Credentials` whose ``repr`` hides it, so
it cannot end up in a log line by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class CredentialsError(Exception):
    pass


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)


def load_credentials(path: Path, host: str, port: int, mx: bool) -> Credentials:
    entries: dict[str, str] = {}
    plain: str | None = None
    for number, raw in enumerate(path.read_text("utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) == 2:  # Postfix sasl_passwd: KEY user:password
            entries[parts[0].lower()] = parts[1]
        elif ":" in line:
            plain = line
        else:
            raise CredentialsError(f"{path}:{number}: expected 'user:password' or "
                                   "'[host]:port user:password'")
    bracketed = f"[{host}]" if not mx else host
    for key in (f"{bracketed}:{port}".lower(), bracketed.lower(), f"{host}:{port}".lower(),
                host.lower()):
        if key in entries:
            plain = entries[key]
            break
    if plain is None:
        raise CredentialsError(f"{path}: no entry for [{host}]:{port}")
    user, sep, password = plain.partition(":")
    if not sep or not user:
        raise CredentialsError(f"{path}: entry for {host} is not 'user:password'")
    return Credentials(user, password)
