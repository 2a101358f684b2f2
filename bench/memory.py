"""Memory per idle connection: RSS of one node holding N sessions, plain and after STARTTLS.

    python bench/memory.py [--connections 1000] [--quick]

Targets from the performance issue: <= 4 KiB per plain connection, <= 32 KiB
after STARTTLS (asyncio's own TLS transport allocates 256 KiB each; uvloop's
``start_tls`` does not).
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support import MailhopNode, make_certs


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def measure(node: MailhopNode, n: int, tls: bool) -> float:
    assert node.proc is not None
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    warm = socket.create_connection((node.host, node.port))
    read_reply(warm)
    time.sleep(0.5)
    before = rss_kib(node.proc.pid)
    held: list[socket.socket] = []
    for _ in range(n):
        s = socket.create_connection((node.host, node.port))
        read_reply(s)
        if tls:
            s.sendall(b"EHLO bench\r\n")
            read_reply(s)
            s.sendall(b"STARTTLS\r\n")
            read_reply(s)
            s = ctx.wrap_socket(s, server_hostname="localhost")
        held.append(s)
    time.sleep(1.0)
    after = rss_kib(node.proc.pid)
    for s in held:
        s.close()
    warm.close()
    return (after - before) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, no claims")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    n = 50 if args.quick else args.connections
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="mailhop-mem-") as tmp:
        certs = make_certs(Path(tmp) / "certs")
        for tls in (False, True):
            node = MailhopNode(Path(tmp) / f"node-{tls}", relay=None,
                               listen=f'max_connections = {n + 100}\n'
                                      f'tls = {{ cert = "{certs.cert}", key = "{certs.key}" }}\n',
                               extra="[queue]\nhold_delivery = true\n").start()
            try:
                rows["starttls" if tls else "plain"] = round(measure(node, n, tls), 2)
            finally:
                node.stop()
    print(f"RSS per idle connection, {n} connections held by one node")
    print(f"  plain     {rows['plain']:8.2f} KiB   (target <= 4 KiB)")
    print(f"  STARTTLS  {rows['starttls']:8.2f} KiB   (target <= 32 KiB)")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "memory", "connections": n,
                                         "kib_per_connection": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
