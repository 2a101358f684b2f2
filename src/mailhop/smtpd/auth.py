"""SMTP AUTH users: a file of ``user:$scrypt$...`` lines, hashed with stdlib scrypt.

Why a file and scrypt: no database to run next to a relay, and scrypt is
memory-hard and in the standard library.  Verification costs ~50 ms of
CPU, so the listener runs it in a worker thread, never on the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

_N_LOG2, _R, _P = 14, 8, 1
_DUMMY = None  # a hash to check unknown users against, so timing does not tell


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1 << _N_LOG2, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"$scrypt$ln={_N_LOG2},r={_R},p={_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(stored: str, password: str) -> bool:
    try:
        _, scheme, params, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        opts = dict(item.split("=") for item in params.split(","))
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt),
                                n=1 << int(opts["ln"]), r=int(opts["r"]), p=int(opts["p"]),
                                dklen=len(expected), maxmem=256 << 20)
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(actual, expected)


class UserFileError(Exception):
    pass


class UserDB:
    def __init__(self, users: dict[str, str]) -> None:
        self._users = users

    @classmethod
    def load(cls, path: Path) -> UserDB:
        users: dict[str, str] = {}
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, stored = line.partition(":")
            if not sep or not stored.startswith("$scrypt$"):
                raise UserFileError(f"{path}:{number}: expected 'user:$scrypt$...' "
                                    "(write entries with 'mailhop passwd')")
            users[user] = stored
        return cls(users)

    def verify(self, user: str, password: str) -> bool:
        global _DUMMY
        stored = self._users.get(user)
        if stored is None:
            _DUMMY = _DUMMY or hash_password(secrets.token_hex(8))
            verify_password(_DUMMY, password)
            return False
        return verify_password(stored, password)


def set_password(path: Path, user: str, password: str) -> None:
    """Add or replace ``user`` in ``path``, written atomically with mode 0600."""
    if ":" in user or not user or not user.isprintable():
        raise UserFileError(f"invalid user name {user!r}")
    lines = path.read_text("utf-8").splitlines() if path.exists() else []
    entry = f"{user}:{hash_password(password)}"
    out = [line for line in lines if line.partition(":")[0] != user] + [entry]
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
