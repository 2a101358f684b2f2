"""``mailhop demo``: the seed's whole chain on this machine, on loopback, in a minute.

    mail -s ... ──► ingress :2525 ──► egress :3535 ──► SES stand-in :5870
                    (Shanghai)        (Tokyo)          STARTTLS + AUTH required,
                                                       certificate from a CA made now

Three real ``mailhop serve`` processes with generated configs (the same
shape as ``examples/seed/``), a CA and certificate minted with trustme, an
AUTH user for the stand-in and a 0600 credentials file for the egress,
which relays with ``tls = "verify"``.  Then a few messages go in at the
ingress like ``mail -s`` would send them, and the demo waits until the
stand-in holds all of them, and shows each message's path from the logs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..smtpd.auth import set_password
from .submit import SubmitError, build_mail_message, run_submit
from .trace import LogIndex

STANDIN_HOST = "email-smtp.demo.test"
WANTED_PORTS = {"ingress": 2525, "egress": 3535, "ses": 5870}


@dataclass
class DemoNode:
    name: str
    title: str
    port: int
    config: Path
    log: Path
    spool: Path
    proc: subprocess.Popen[bytes] | None = None


def _port(wanted: int) -> int:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener will
        try:
            s.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.05)
    return False


class Demo:
    def __init__(self, messages: int, keep: bool, console: Console) -> None:
        self.messages = messages
        self.keep = keep
        self.console = console
        self.work = Path(tempfile.mkdtemp(prefix="mailhop-demo-"))
        self.nodes: dict[str, DemoNode] = {}

    # -- set up -------------------------------------------------------------
    def write_configs(self) -> None:
        import trustme

        w = self.work
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(w / "demo-ca.pem"))
        for name, host in (("ses", STANDIN_HOST), ("egress", "egress.demo.test")):
            cert = ca.issue_cert(host, "127.0.0.1")
            cert.cert_chain_pems[0].write_to_path(str(w / f"{name}.crt"))
            cert.private_key_pem.write_to_path(str(w / f"{name}.key"))
            (w / f"{name}.key").chmod(0o600)
        password = secrets.token_urlsafe(16)
        set_password(w / "ses-users", "demo-ses-user", password)
        secret = w / "ses.secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"demo-ses-user:{password}\n")
        (w / "hosts").write_text(f"127.0.0.1 {STANDIN_HOST}\n")
        for name, title in (("ingress", "ingress (Shanghai)"), ("egress", "egress (Tokyo)"),
                            ("ses", "SES stand-in")):
            self.nodes[name] = DemoNode(name, title, _port(WANTED_PORTS[name]),
                                        w / f"{name}.toml", w / f"{name}.log", w / name)
        ing, eg, ses = self.nodes["ingress"], self.nodes["egress"], self.nodes["ses"]
        common = '[queue]\nmin_backoff = "2s"\nmax_backoff = "10s"\nrun_delay = "2s"\n'
        ing.config.write_text(f"""# Shanghai: relays mail from listed networks over the private link
[node]
name = "ingress"
hostname = "ingress.demo.test"
spool = "{ing.spool}"
min_free = "16M"

[[listen]]
address = "127.0.0.1:{ing.port}"
networks = ["127.0.0.0/8"]

[log]
maillog = "{ing.log}"

[relay]
default = "tokyo"

[nexthop.tokyo]
host = "[127.0.0.1]"
port = {eg.port}
tls = "may"

{common}""")
        eg.config.write_text(f"""# Tokyo: relays the ingress's mail to SES (STARTTLS, AUTH)
[node]
name = "egress"
hostname = "egress.demo.test"
spool = "{eg.spool}"
min_free = "16M"

[[listen]]
address = "127.0.0.1:{eg.port}"
networks = ["127.0.0.0/8"]
tls = {{ cert = "{w / 'egress.crt'}", key = "{w / 'egress.key'}" }}

[log]
maillog = "{eg.log}"

[relay]
default = "ses"

[nexthop.ses]
host = "{STANDIN_HOST}"
port = {ses.port}
mx = false
tls = "verify"
ca_file = "{w / 'demo-ca.pem'}"
credentials = "{secret}"

[resolver]
hosts = "{w / 'hosts'}"

{common}""")
        ses.config.write_text(f"""# SES stand-in: STARTTLS and AUTH required; keeps the mail
[node]
name = "ses"
hostname = "{STANDIN_HOST}"
spool = "{ses.spool}"
min_free = "16M"

[[listen]]
address = "127.0.0.1:{ses.port}"
networks = []
tls = {{ cert = "{w / 'ses.crt'}", key = "{w / 'ses.key'}" }}
auth = "required"
users = "{w / 'ses-users'}"
require_tls = true

[log]
maillog = "{ses.log}"

[queue]
hold_delivery = true
""")

    def start(self) -> str | None:
        for name in ("ses", "egress", "ingress"):
            node = self.nodes[name]
            out = open(self.work / f"{name}.out", "ab")  # noqa: SIM115 - the child owns it
            node.proc = subprocess.Popen(
                [sys.executable, "-m", "mailhop", "serve", "-c", str(node.config)],
                stdout=out, stderr=out, start_new_session=True)
            out.close()
            if not _wait_port(node.port, node.proc):
                text = (self.work / f"{name}.out").read_text()[-800:]
                return f"the {node.title} node did not start:\n{text}"
        return None

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            if node.proc is not None:
                try:
                    node.proc.wait(15)
                except subprocess.TimeoutExpired:
                    node.proc.kill()

    # -- the run --------------------------------------------------------------
    def send(self) -> list[str]:
        ing = self.nodes["ingress"]
        ids = []
        for i in range(1, self.messages + 1):
            body = f"Hello from Shanghai, message {i} of {self.messages}.\n".encode()
            data = build_mail_message(f"mailhop demo {i}", "app@shanghai.example.com",
                                      ["user@tokyo.example.net"], body)
            result = run_submit(("127.0.0.1", ing.port), "app@shanghai.example.com",
                                ["user@tokyo.example.net"], data)
            ids.append(result.queue_id)
        return ids

    def arrived(self) -> int:
        log = self.nodes["ses"].log
        return log.read_text().count("(queue active)") if log.exists() else 0

    def wait(self, timeout: float) -> bool:
        with Progress(TextColumn("[bold]waiting for the SES stand-in"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=self.console, transient=True) as progress:
            task = progress.add_task("arrived", total=self.messages)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                done = self.arrived()
                progress.update(task, completed=done)
                if done >= self.messages:
                    return True
                time.sleep(0.1)
        return False

    def report(self, ingress_ids: list[str], seconds: float) -> int:
        index = LogIndex([n.log for n in self.nodes.values()])
        titles = {n.log.name: n.title for n in self.nodes.values()}
        c = self.console
        complete = 0
        for i, qid in enumerate(ingress_ids, 1):
            hops = index.trace(qid)
            c.print(f"[bold]message {i}[/bold] {hops[0].message_id if hops else qid}",
                    soft_wrap=True)
            for n, h in enumerate(hops, 1):
                title = titles.get(Path(h.log).name, h.host)
                if h.deliveries:
                    d = h.deliveries[0]
                    c.print(f"  {n} {title:<19} {h.queue_id}  → {d.relay:<38} delay "
                            f"{d.delay}s ({d.delays})  {d.status}", soft_wrap=True)
                else:
                    c.print(f"  {n} {title:<19} {h.queue_id}  accepted from {h.client}",
                            soft_wrap=True)
            if len(hops) == 3:
                complete += 1
        c.print("\n[bold]maillog lines[/bold] (grep by queue ID, as in the seed post):")
        for n in self.nodes.values():
            wanted = {h.queue_id for qid in ingress_ids for h in index.trace(qid)}
            for line in n.log.read_text().splitlines():
                if any(f" {q}: " in line for q in wanted):
                    c.print(f"  [dim]{n.name:<8}[/dim] {line}", highlight=False, soft_wrap=True)
        ok = complete == len(ingress_ids)
        verdict = "[green]OK[/green]" if ok else "[red]FAILED[/red]"
        c.print(f"\n{verdict}: {complete}/{len(ingress_ids)} messages went ingress → egress → "
                f"SES stand-in (STARTTLS verified, AUTH) in {seconds:.1f}s; ports "
                + ", ".join(f"{n.name}={n.port}" for n in self.nodes.values()), soft_wrap=True)
        return 0 if ok else 1

    def explain_keep(self) -> None:
        c = self.console
        ing = self.nodes["ingress"]
        c.print(f"\nThe chain keeps running; its files are in {self.work}")
        for n in self.nodes.values():
            assert n.proc is not None
            c.print(f"  {n.title:<20} 127.0.0.1:{n.port}  pid {n.proc.pid}  config {n.config}",
                    soft_wrap=True)
        c.print("Send more mail:\n"
                f"  echo hello | mailhop send -s test -r app@shanghai.example.com "
                f"user@tokyo.example.net --server 127.0.0.1:{ing.port}\n"
                f"Follow a message:\n  mailhop trace QUEUE_ID --log {self.work}\n"
                "Stop it:\n  kill " + " ".join(str(n.proc.pid) for n in self.nodes.values()
                                              if n.proc) + f" && rm -rf {self.work}",
                highlight=False, soft_wrap=True)

    def failure_hint(self) -> str:
        log = self.nodes["ingress"].log.read_text() + self.nodes["egress"].log.read_text()
        lines = [ln for ln in log.splitlines() if "status=" in ln and "status=sent" not in ln]
        return lines[-1] if lines else "no delivery attempt was logged"


def run(messages: int = 3, keep: bool = False, timeout: float = 60.0) -> int:
    console = Console(highlight=False)
    demo = Demo(messages, keep, console)
    console.print(f"[bold]mailhop demo[/bold]: ingress → egress → SES stand-in on loopback "
                  f"({demo.work})", soft_wrap=True)
    code = 1
    try:
        demo.write_configs()
        problem = demo.start()
        if problem:
            console.print(f"[red]error:[/red] {problem}")
            return 1
        started = time.monotonic()
        try:
            ids = demo.send()
        except SubmitError as exc:
            console.print(f"[red]error:[/red] submitting to the ingress failed: {exc}")
            return 1
        console.print(f"submitted {len(ids)} messages to the ingress like `mail -s` would: "
                      + ", ".join(ids), soft_wrap=True)
        if not demo.wait(timeout):
            console.print(f"[red]error:[/red] only {demo.arrived()}/{messages} messages reached "
                          f"the SES stand-in within {timeout:.0f}s; last problem: "
                          f"{demo.failure_hint()}")
            return 1
        time.sleep(0.3)  # let the last "removed" lines reach the logs
        code = demo.report(ids, time.monotonic() - started)
        return code
    finally:
        if keep and code == 0:
            demo.explain_keep()
        else:
            demo.stop()
            shutil.rmtree(demo.work, ignore_errors=True)
