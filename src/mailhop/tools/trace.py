"""Follow one message through the maillogs of every hop (``mailhop trace``).

The seed post verified its chain by grepping two machines' logs for queue
IDs by hand.  Every hop that delivers logs ``status=sent (250 ... queued as
NEXTID)``, so given the logs of all nodes the path can be rebuilt: start at
a queue ID (or a Message-ID), read its lines, jump to the ID the next hop
gave it, repeat.  Works on mailhop's and Postfix's logs alike.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

_LINE = re.compile(r"^(?P<stamp>\w{3} [ \d]\d \d\d:\d\d:\d\d) (?P<host>\S+) "
                   r"(?P<prog>[\w.-]+/[\w.-]+)\[\d+\]: (?P<qid>[0-9A-Za-z]+): (?P<text>.*)$")
_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")
_NOT_IDS = frozenset({"NOQUEUE", "warning", "fatal", "panic", "error"})
_FIELDS = re.compile(r"(\w+)=(<[^>]*>|[^,\s]+)")


@dataclass
class Delivery:
    to: str
    relay: str
    delay: str
    delays: str
    dsn: str
    status: str
    reply: str
    time: str
    next_id: str | None = None


@dataclass
class Hop:
    host: str
    log: str
    queue_id: str
    received: str = ""
    client: str = ""
    sender: str = ""
    message_id: str = ""
    size: str = ""
    deliveries: list[Delivery] = field(default_factory=list)
    removed: bool = False
    lines: list[str] = field(default_factory=list)


class LogIndex:
    """Every queue ID's lines, from any number of log files."""

    def __init__(self, paths: list[Path]) -> None:
        self.by_id: dict[str, list[tuple[str, re.Match[str]]]] = {}
        self.by_message_id: dict[str, list[str]] = {}
        for path in _expand(paths):
            for line in path.read_text("utf-8", "replace").splitlines():
                m = _LINE.match(line)
                if m is None:
                    continue
                qid = m.group("qid")
                if qid in _NOT_IDS:
                    continue
                self.by_id.setdefault(qid, []).append((str(path), m))
                text = m.group("text")
                if text.startswith("message-id="):
                    self.by_message_id.setdefault(text[11:].strip(), []).append(qid)

    def find_start(self, wanted: str) -> str | None:
        if wanted in self.by_id:
            return wanted
        key = wanted if wanted.startswith("<") else f"<{wanted}>"
        ids = self.by_message_id.get(key) or self.by_message_id.get(wanted)
        if not ids:
            return None
        # The first hop is the one no other hop delivered to.
        forwarded = {d for qid in self.by_id for d in self._next_ids(qid)}
        firsts = [i for i in ids if i not in forwarded]
        return (firsts or ids)[0]

    def _next_ids(self, qid: str) -> list[str]:
        out = []
        for _, m in self.by_id.get(qid, []):
            if "status=sent" in m.group("text"):
                found = _QUEUED_AS.search(m.group("text"))
                if found:
                    out.append(found.group(1))
        return out

    def hop(self, qid: str) -> Hop:
        entries = self.by_id[qid]
        path, first = entries[0]
        hop = Hop(first.group("host"), path, qid)
        for _, m in entries:
            text = m.group("text")
            hop.lines.append(m.group(0))
            fields = {k: v for k, v in _FIELDS.findall(text)}
            if text.startswith("client="):
                hop.client, hop.received = text[7:].split(",")[0], m.group("stamp")
            elif text.startswith("message-id="):
                hop.message_id = text[11:].strip()
            elif text.startswith("from=") and "size=" in text:
                hop.sender, hop.size = fields.get("from", ""), fields.get("size", "")
                hop.received = hop.received or m.group("stamp")
            elif text.startswith("to="):
                reply = text[text.find(" (") + 2 : -1] if " (" in text else ""
                queued = _QUEUED_AS.search(reply)
                hop.deliveries.append(Delivery(
                    fields.get("to", ""), fields.get("relay", ""), fields.get("delay", ""),
                    fields.get("delays", ""), fields.get("dsn", ""),
                    fields.get("status", ""), reply, m.group("stamp"),
                    queued.group(1) if queued and fields.get("status") == "sent" else None))
            elif text == "removed":
                hop.removed = True
        return hop

    def trace(self, wanted: str) -> list[Hop]:
        """Hops in order, following the first ``queued as`` link of each hop."""
        start = self.find_start(wanted)
        hops: list[Hop] = []
        seen: set[str] = set()
        qid = start
        while qid is not None and qid in self.by_id and qid not in seen:
            seen.add(qid)
            hop = self.hop(qid)
            hops.append(hop)
            qid = next((d.next_id for d in hop.deliveries if d.next_id), None)
        return hops

    def final_id(self, hops: list[Hop]) -> str | None:
        """The ID the last hop in the logs was given by a server whose log we lack."""
        if not hops:
            return None
        return next((d.next_id for d in hops[-1].deliveries if d.next_id), None)


def _expand(paths: list[Path]) -> list[Path]:
    out = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and "log" in p.name)
        else:
            out.append(path)
    return out


def as_dict(hops: list[Hop]) -> list[dict[str, object]]:
    return [{k: v for k, v in asdict(h).items() if k != "lines"} for h in hops]


def render(hops: list[Hop], final_id: str | None = None, lines: bool = False) -> str:
    out = []
    for i, hop in enumerate(hops, 1):
        out.append(f"hop {i}: {hop.host} queue ID {hop.queue_id}  (log {hop.log})")
        if hop.client:
            out.append(f"  received {hop.received} from {hop.client}, from={hop.sender} "
                       f"size={hop.size} {hop.message_id}")
        for d in hop.deliveries:
            nxt = f" -> {d.next_id}" if d.next_id else ""
            out.append(f"  {d.time} to={d.to} relay={d.relay} delay={d.delay} "
                       f"delays={d.delays} dsn={d.dsn} status={d.status}{nxt}")
            if d.status != "sent":
                out.append(f"      ({d.reply})")
        if hop.removed:
            out.append("  removed from the queue")
        if lines:
            out += [f"    | {line}" for line in hop.lines]
    if final_id:
        out.append(f"last hop accepted it as {final_id} (no log given for that server)")
    return "\n".join(out)
