"""Config mistakes: one line naming file, key and problem; exit code 2; no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import mailhop, make_certs

GOOD = """\
[node]
spool = "spool"

[[listen]]
address = "127.0.0.1:2525"
networks = ["127.0.0.0/8"]
"""


def check(tmp_path: Path, text: str):
    path = tmp_path / "node.toml"
    path.write_text(text)
    result = mailhop("check-config", "-c", str(path))
    assert "Traceback" not in result.stderr
    return path, result


def test_good_config_passes(tmp_path: Path) -> None:
    _, result = check(tmp_path, GOOD)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.parametrize(("text", "key", "problem"), [
    (GOOD.replace("127.0.0.0/8", "127.0.0.0/33"), "listen[0].networks[0]",
     "invalid CIDR network '127.0.0.0/33'"),
    (GOOD.replace("127.0.0.0/8", "10.0.0.300/8"), "listen[0].networks[0]", "invalid CIDR"),
    (GOOD + 'netwroks = ["10.0.0.0/8"]\n', "listen[0].netwroks", "unknown key"),
    (GOOD + "[nodee]\n", "nodee", "unknown key"),
    (GOOD.replace(":2525", ":70000"), "listen[0].address", "port must be a number from 1 to"),
    (GOOD.replace(":2525", ":smtp"), "listen[0].address", "port must be a number"),
    (GOOD.replace("127.0.0.1:2525", "::1:2525"), "listen[0].address", "[ADDRESS]:PORT"),
    (GOOD + 'tls = { cert = "missing.crt", key = "missing.key" }\n', "listen[0].tls.cert",
     "file not found"),
    (GOOD + 'auth = "sometimes"\n', "listen[0].auth", "must be one of none, optional, required"),
    (GOOD + 'idle_timeout = "soon"\n', "listen[0].idle_timeout", "is not a duration"),
    (GOOD + "max_recipients = 10\n", "listen[0].max_recipients", "at least 100"),
    (GOOD + "max_connections = true\n", "listen[0].max_connections", "not a boolean"),
    (GOOD + 'auth = "optional"\n', "listen[0].users", "is required"),
    (GOOD.replace("[[listen]]\naddress", "[[listen]]\nadress"), "listen[0].address",
     "is required"),
    ("[node]\n", "listen", "is required"),
    (GOOD + "[queue]\nmin_backoff = '2h'\nmax_backoff = '1h'\n", "queue.max_backoff",
     "must not be smaller"),
])
def test_config_mistakes(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path, result = check(tmp_path, text)
    assert result.returncode == 2
    assert result.stderr.startswith(f"mailhop: {path}: {key}: ")
    assert problem in result.stderr
    assert result.stderr.count("\n") == 1


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path, result = check(tmp_path, "[node\n")
    assert result.returncode == 2 and f"{path}: invalid TOML" in result.stderr
    result = mailhop("check-config", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_unloadable_certificate(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    _, result = check(tmp_path, GOOD + f'tls = {{ cert = "{bad}", key = "{certs.key}" }}\n')
    assert result.returncode == 2 and "listen[0].tls: cannot load certificate" in result.stderr


def test_serve_with_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(GOOD + "bogus = 1\n")
    result = mailhop("serve", "-c", str(path))
    assert result.returncode == 2 and "listen[0].bogus: unknown key" in result.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "node.toml"
        path.write_text(GOOD.replace("2525", str(port)).replace('"spool"',
                                                                 f'"{tmp_path / "spool"}"'))
        result = mailhop("serve", "-c", str(path))
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "Traceback" not in result.stderr
