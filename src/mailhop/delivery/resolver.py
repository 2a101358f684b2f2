"""Name resolution for next hops: static answers, MX via dnspython, A/AAAA.

Order: a static hosts file from the config (``[resolver] hosts``, /etc/hosts
format) answers first — that is how the seed pins hosts, and how tests and
the demo stay on loopback; then MX records through dnspython's async
resolver with its cache; addresses through the system resolver (so
/etc/hosts keeps working), cached for a minute.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver

from ..protocol.address import is_ip


class LookupFailed(Exception):
    """A name could not be resolved; ``permanent`` says whether retrying can help."""

    def __init__(self, text: str, *, permanent: bool = False) -> None:
        super().__init__(text)
        self.permanent = permanent


@dataclass(frozen=True)
class Target:
    """One host to try, with all its addresses (both families)."""

    host: str
    addresses: tuple[str, ...]
    preference: int = 0


def parse_hosts(path: Path) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for line in path.read_text("utf-8").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            ip = str(ipaddress.ip_address(fields[0]))
        except ValueError:
            continue
        for name in fields[1:]:
            table.setdefault(name.lower().rstrip("."), []).append(ip)
    return table


class Resolver:
    ADDRESS_TTL = 60.0

    def __init__(self, hosts_file: Path | None = None) -> None:
        self.static = parse_hosts(hosts_file) if hosts_file else {}
        self._dns: dns.asyncresolver.Resolver | None = None
        self._addr_cache: dict[str, tuple[float, tuple[str, ...]]] = {}

    def _resolver(self) -> dns.asyncresolver.Resolver:
        if self._dns is None:
            self._dns = dns.asyncresolver.Resolver()
            self._dns.cache = dns.resolver.Cache()
            self._dns.lifetime = 10.0
        return self._dns

    async def addresses(self, name: str) -> tuple[str, ...]:
        key = name.lower().rstrip(".")
        if is_ip(key):
            return (key,)
        if key in self.static:
            return tuple(self.static[key])
        cached = self._addr_cache.get(key)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(key, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            permanent = exc.errno == socket.EAI_NONAME
            raise LookupFailed(f"Host or domain name not found. Name service error for "
                               f"name={name} type=A: {exc.strerror}",
                               permanent=permanent) from None
        found = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        self._addr_cache[key] = (time.monotonic() + self.ADDRESS_TTL, found)
        return found

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """MX hosts by preference; ``[]`` means no MX (use the domain itself)."""
        key = domain.lower().rstrip(".")
        if key in self.static or is_ip(key):
            return []
        try:
            answer = await self._resolver().resolve(key, "MX")
        except dns.resolver.NXDOMAIN:
            raise LookupFailed(f"Host or domain name not found. Name service error for "
                               f"name={domain} type=MX: Host not found", permanent=True) from None
        except dns.resolver.NoAnswer:
            return []
        except (dns.exception.DNSException, OSError) as exc:
            raise LookupFailed(f"Name service error for name={domain} type=MX: "
                               f"{exc.__class__.__name__}") from None
        records = sorted((int(r.preference), str(r.exchange).rstrip(".")) for r in answer)
        if records == [(0, "")]:  # RFC 7505 null MX: the domain accepts no mail
            raise LookupFailed(f"Domain {domain} does not accept mail (null MX)",
                               permanent=True)
        return records

    async def targets(self, host: str, mx: bool) -> list[Target]:
        """Every host to try for a next hop, best first, each with all its addresses."""
        if not mx:
            return [Target(host, await self.addresses(host))]
        records = await self.mx(host) or [(0, host)]
        targets, errors = [], []
        for preference, name in records:
            try:
                targets.append(Target(name, await self.addresses(name), preference))
            except LookupFailed as exc:
                errors.append(exc)
        if not targets:
            raise errors[0]
        return targets
