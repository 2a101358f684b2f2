"""Test helpers: real mailhop nodes as subprocesses, real Postfix instances, certificates.

Everything binds to loopback.  Peers from Debian packages are required in
CI (``CI=true``): a missing one fails the test instead of skipping it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_peer(*commands: str) -> None:
    """Skip locally, fail in CI, when a Debian peer program is missing."""
    missing = [c for c in commands if shutil.which(c) is None
               and not Path("/usr/sbin", c).exists()]
    if missing:
        message = f"peer program(s) not installed: {', '.join(missing)}"
        if IN_CI:
            pytest.fail(message + " (CI must install them: see .ci/run)")
        pytest.skip(message)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path, *names: str) -> Certs:
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert(*(names or ("localhost", "127.0.0.1", "::1")))
    directory.mkdir(parents=True, exist_ok=True)
    paths = Certs(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(paths.ca))
    server.cert_chain_pems[0].write_to_path(str(paths.cert))
    server.private_key_pem.write_to_path(str(paths.key))
    paths.key.chmod(0o600)
    return paths


def mailhop(*args: str, stdin: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailhop", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


class MailhopNode:
    """A real ``mailhop serve`` process with its own config, spool and maillog."""

    def __init__(self, directory: Path, *, listen: str = "", extra: str = "",
                 host: str = "127.0.0.1", networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128"),
                 name: str = "node", spool: Path | None = None, min_free: str = "1M",
                 relay: str | None = "[127.0.0.1]:1", hop: str = 'tls = "none"',
                 queue: str = "") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = free_port(host)
        self.name = name
        self.maillog = self.dir / "maillog"
        self.spool = spool or self.dir / "spool"
        self.config = self.dir / "node.toml"
        addr = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        nets = ", ".join(f'"{n}"' for n in networks)
        self.config.write_text(textwrap.dedent(f"""\
            [node]
            name = "{name}"
            hostname = "{name}.test"
            spool = "{self.spool}"
            min_free = "{min_free}"

            [[listen]]
            address = "{addr}"
            networks = [{nets}]
            """) + textwrap.dedent(listen) + "\n" + textwrap.dedent(f"""\
            [log]
            maillog = "{self.maillog}"
            """) + self._relay(relay, hop, queue) + textwrap.dedent(extra))
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def _relay(relay: str | None, hop: str, queue: str) -> str:
        """Tests never resolve real names: by default mail goes to a closed loopback port.

        ``relay`` is ``HOST:PORT`` of the single next hop, ``hop`` more keys for it, and
        ``queue`` more keys for [queue] (whose backoff is seconds, not minutes, here)."""
        if relay is None:
            return ""
        host, _, port = relay.rpartition(":")
        return textwrap.dedent(f"""
            [relay]
            default = "next"

            [nexthop.next]
            host = "{host}"
            port = {port}
            """) + textwrap.dedent(hop) + "\n[queue]\n" + "".join(
            f"{k} = {v}\n" for k, v in MailhopNode._queue_keys(queue).items())

    @staticmethod
    def _queue_keys(overrides: str) -> dict[str, str]:
        keys = {"min_backoff": '"1s"', "max_backoff": '"4s"', "run_delay": '"1s"'}
        for line in textwrap.dedent(overrides).splitlines():
            key, sep, value = line.partition("=")
            if sep:
                keys[key.strip()] = value.strip()
        return keys

    def start(self) -> MailhopNode:
        self.stderr = open(self.dir / "stderr.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailhop", "serve", "-c", str(self.config)],
            stdout=self.stderr, stderr=self.stderr)
        try:
            wait_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError("mailhop did not start: "
                               + (self.dir / "stderr.log").read_text()[-2000:]) from None
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        self.stderr.close()
        return code

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def queue(self) -> list[dict]:
        result = mailhop("queue", "list", "--json", "--spool", str(self.spool))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def log(self) -> str:
        return self.maillog.read_text() if self.maillog.exists() else ""


def auth_node(directory: Path, user: str, password: str, *, auth: str = "optional",
              names: tuple[str, ...] = (), listen: str = "", **node_args) -> MailhopNode:
    """A started node offering STARTTLS (trustme certificate for ``names``) and AUTH for
    one user; the node's ``certs`` attribute has the CA for clients."""
    certs = make_certs(directory / "certs", *names)
    users = directory / "users"
    assert mailhop("passwd", str(users), user, "--password-stdin",
                   stdin=password + "\n").returncode == 0
    node = MailhopNode(directory / "node", listen=f"""\
        auth = "{auth}"
        users = "{users}"
        tls = {{ cert = "{certs.cert}", key = "{certs.key}" }}
        """ + textwrap.dedent(listen), **node_args)
    node.certs = certs  # type: ignore[attr-defined]
    return node.start()


class PostfixInstance:
    """A private Postfix instance (own config, queue and maillog) on loopback."""

    def __init__(self, directory: Path, *, relayhost: str | None = None,
                 main_extra: str = "") -> None:
        require_peer("postfix")
        # Postfix daemons run as the postfix user: pytest's 0700 tmp dirs are closed
        # to them, so the instance lives in a world-traversable directory of its own.
        self.dir = Path(tempfile.mkdtemp(prefix="mailhop-postfix-"))
        self.dir.chmod(0o755)
        directory.mkdir(parents=True, exist_ok=True)
        self.keep = directory
        self.port = free_port()
        self.conf = self.dir / "conf"
        self.maillog = self.dir / "maillog"
        for sub in ("conf", "queue", "data"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.dir / "data", "postfix")
        # With no relayhost, nothing may leave this machine: no DNS, no port 25.
        relay = (f"relayhost = {relayhost}" if relayhost else
                 "default_transport = error:this test instance delivers nothing outside")
        (self.conf / "main.cf").write_text(textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {self.dir}/queue
            data_directory = {self.dir}/data
            mail_owner = postfix
            setgid_group = postdrop
            myhostname = postfix-{self.port}.test
            inet_interfaces = 127.0.0.1
            inet_protocols = ipv4
            mynetworks = 127.0.0.0/8
            mydestination =
            {relay}
            maillog_file = {self.maillog}
            maillog_file_prefixes = {self.dir}
            alias_maps =
            alias_database =
            smtp_tls_security_level = none
            smtpd_tls_security_level = none
            minimal_backoff_time = 2s
            maximal_backoff_time = 4s
            queue_run_delay = 2s
            """) + textwrap.dedent(main_extra))
        master_cf = Path("/etc/postfix/master.cf")
        if not master_cf.exists():  # package installed with "No configuration"
            master_cf = Path("/usr/share/postfix/master.cf.dist")
        master = master_cf.read_text()
        master = re.sub(r"(?m)^smtp\s+inet\s.*$",
                        f"127.0.0.1:{self.port} inet n - n - - smtpd", master)
        (self.conf / "master.cf").write_text(master)

    def final_hop(self, domain: str = "example.com",
                  access: dict[str, str] | None = None) -> PostfixInstance:
        """Deliver ``domain`` into one maildir; ``access`` maps recipients to replies."""
        import pwd

        pw = pwd.getpwnam("postfix")
        mail = self.dir / "mail"
        mail.mkdir(exist_ok=True)
        os.chown(mail, pw.pw_uid, pw.pw_gid)
        (self.conf / "access").write_text(
            "".join(f"{addr} {reply}\n" for addr, reply in (access or {}).items()))
        self.postconf(
            f"virtual_mailbox_domains = {domain}", f"virtual_mailbox_base = {mail}",
            "virtual_mailbox_maps = static:sink/", f"virtual_uid_maps = static:{pw.pw_uid}",
            f"virtual_gid_maps = static:{pw.pw_gid}",
            f"smtpd_recipient_restrictions = check_recipient_access texthash:{self.conf}/access,"
            " permit_mynetworks, reject_unauth_destination")
        return self

    def delivered(self) -> list[bytes]:
        """Messages in the final-hop maildir, oldest first."""
        new = self.dir / "mail" / "sink" / "new"
        if not new.exists():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir(), key=lambda p: p.stat().st_mtime)]

    def postconf(self, *settings: str) -> None:
        subprocess.run(["postconf", "-c", str(self.conf), "-e", *settings], check=True)

    def start(self) -> PostfixInstance:
        subprocess.run(["postfix", "-c", str(self.conf), "start"], check=True,
                       capture_output=True)
        wait_port("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        pid_file = self.dir / "queue" / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True)
        if pid is not None:  # master exits asynchronously; wait for it
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=10,
                         what="postfix stop")
        with contextlib.suppress(OSError):  # keep the log with the test's files
            shutil.copy(self.maillog, self.keep / "postfix-maillog")
        shutil.rmtree(self.dir, ignore_errors=True)

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.conf), "-f"], capture_output=True)

    def log(self) -> str:
        return self.maillog.read_text() if self.maillog.exists() else ""

    def wait_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        regex = re.compile(pattern)
        return wait_for(lambda: regex.search(self.log()), timeout=timeout,
                        what=f"{pattern!r} in postfix log")


def strip_trace(message: bytes) -> bytes:
    """A delivered message without the trace lines relays add (Received, Return-Path,
    Delivered-To), so what remains can be compared byte for byte with what was sent."""
    text = message.replace(b"\r\n", b"\n")
    head, _, body = text.partition(b"\n\n")
    out, skip = [], False
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if not skip:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].lower()
        skip = name in (b"received", b"return-path", b"delivered-to", b"x-original-to")
        if not skip:
            out.append(line)
    return b"\n".join(out) + b"\n\n" + body


class RecordingProxy:
    """A TCP proxy on loopback that records what the client sent (to check that no
    password ever crossed the wire), in its own thread so synchronous tests can use it."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self.client_bytes = bytearray()
        self._stop = threading.Event()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", self.port))
        self._server.listen(16)
        self._server.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        src.settimeout(None)
        try:
            while data := src.recv(65536):
                if record:
                    self.client_bytes += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._server.close()
