"""The local control channel between ``mailhop queue ...`` and a running node.

A running node owns its spool's writer, so queue changes go through it:
the CLI sends one JSON line over a Unix socket and the node applies the
change in its group commit and updates its scheduler (a held message's
queued jobs are dropped, a flushed queue is scanned at once).  When no node
runs, the CLI applies the very same :mod:`mailhop.spool.ops` itself.

The socket lives in Linux's abstract namespace (no path length limit, no
stale file after ``kill -9``); since abstract sockets have no file
permissions, the node checks the caller's uid with ``SO_PEERCRED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def socket_name(spool: Path) -> str:
    digest = hashlib.sha256(str(spool.resolve()).encode()).hexdigest()[:24]
    return f"\0mailhop-{digest}"


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


async def serve(spool: Path, handler: Handler) -> asyncio.AbstractServer:
    me = os.getuid()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = _peer_uid(sock) if sock is not None else -1
            if uid not in (me, 0):
                reply: dict[str, Any] = {"ok": False, "error": "permission denied"}
            else:
                line = await asyncio.wait_for(reader.readline(), 10)
                try:
                    request = json.loads(line)
                    reply = await handler(request)
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(client, path=socket_name(spool))


def request(spool: Path, payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to the node running on ``spool``; raises OSError if none answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_name(spool))
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    with contextlib.suppress(ValueError):
        return json.loads(data)
    raise OSError("no answer from the node")
