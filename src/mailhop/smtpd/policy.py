"""Who may do what on a listener: relay access and connection limits.

Kept apart from the protocol engine (which only knows SMTP) and from the
socket binding (which only moves bytes), so the rules that keep a relay
from being an open relay live in one short file.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter

from ..config import IPNetwork, ListenConfig
from ..protocol.replies import Reply


def client_ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(addr: str, networks: tuple[IPNetwork, ...]) -> bool:
    ip = client_ip(addr)
    return ip is not None and any(ip in net for net in networks)


class AccessPolicy:
    """Relay permission (RFC 5321 7.9) and per-client connection accounting."""

    def __init__(self, cfg: ListenConfig) -> None:
        self.cfg = cfg
        self.per_ip: Counter[str] = Counter()
        self.total = 0
        self.auth_failures: dict[str, list[float]] = {}

    def auth_failed(self, addr: str) -> bool:
        """Count an AUTH failure; True once ``addr`` is blocked (brute force)."""
        now = time.monotonic()
        recent = [t for t in self.auth_failures.get(addr, []) if now - t <
                  self.cfg.auth_block_time]
        recent.append(now)
        self.auth_failures[addr] = recent
        if len(self.auth_failures) > 10000:  # bounded memory under a distributed attack
            self.auth_failures.pop(next(iter(self.auth_failures)))
        return len(recent) >= self.cfg.auth_ip_failure_limit

    def auth_blocked(self, addr: str) -> bool:
        recent = self.auth_failures.get(addr)
        if not recent:
            return False
        now = time.monotonic()
        live = [t for t in recent if now - t < self.cfg.auth_block_time]
        if len(live) != len(recent):
            self.auth_failures[addr] = live
        return len(live) >= self.cfg.auth_ip_failure_limit

    def trusted(self, addr: str) -> bool:
        return in_networks(addr, self.cfg.networks)

    def admit(self, addr: str, trusted: bool) -> Reply | None:
        """Count a new connection, or say why it is refused (421 4.7.0)."""
        if self.total >= self.cfg.max_connections:
            return Reply.of(421, "4.7.0", "Error: too many connections; try again later")
        if not trusted and self.per_ip[addr] >= self.cfg.max_connections_per_ip:
            return Reply.of(421, "4.7.0", f"Error: too many connections from {addr}")
        if not trusted and self.auth_blocked(addr):
            return Reply.of(421, "4.7.0", f"Error: too many authentication failures from "
                            f"{addr}; try again later")
        self.total += 1
        self.per_ip[addr] += 1
        return None

    def release(self, addr: str) -> None:
        self.total -= 1
        self.per_ip[addr] -= 1
        if self.per_ip[addr] <= 0:
            del self.per_ip[addr]

    def check_mail(self, authenticated: str | None) -> Reply | None:
        if self.cfg.auth == "required" and authenticated is None:
            return Reply.of(530, "5.7.0", "Authentication required")
        return None

    def check_rcpt(self, recipient: str, trusted: bool, authenticated: str | None) -> Reply | None:
        if trusted or authenticated is not None:
            return None
        return Reply.of(554, "5.7.1", f"<{recipient}>: Relay access denied")
