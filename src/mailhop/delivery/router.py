"""Which next hop a recipient takes: ordered rules, first match wins, else the default.

A rule matches recipient domains (``example.cn``, or ``.example.cn`` /
``*.example.cn`` for subdomains) and/or senders (``user@domain``,
``@domain`` or ``*@domain``); when it lists both, both must match.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RelayConfig, RouteRule


def _domain_matches(domain: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        pattern = pattern[1:]
    if pattern.startswith("."):
        return domain.endswith(pattern)
    return domain == pattern


def _sender_matches(sender: str, pattern: str) -> bool:
    sender = sender.lower()
    if pattern in ("<>", ""):
        return sender == ""
    if pattern.startswith("*@"):
        pattern = pattern[1:]
    if pattern.startswith("@"):
        return _domain_matches(sender.rpartition("@")[2], pattern[1:])
    return sender == pattern


@dataclass(frozen=True)
class Decision:
    hop: str
    why: str


class Router:
    def __init__(self, cfg: RelayConfig) -> None:
        self.cfg = cfg

    def route(self, recipient: str, sender: str = "") -> Decision:
        domain = recipient.rpartition("@")[2].lower().rstrip(".")
        for rule in self.cfg.routes:
            if self._matches(rule, domain, sender):
                return Decision(rule.hop, f"route[{rule.index}] matches "
                                + self._describe(rule))
        return Decision(self.cfg.default, "no route matches: [relay] default")

    @staticmethod
    def _matches(rule: RouteRule, domain: str, sender: str) -> bool:
        if rule.domains and not any(_domain_matches(domain, p) for p in rule.domains):
            return False
        return not rule.senders or any(_sender_matches(sender, p) for p in rule.senders)

    @staticmethod
    def _describe(rule: RouteRule) -> str:
        parts = []
        if rule.domains:
            parts.append("domains " + ", ".join(rule.domains))
        if rule.senders:
            parts.append("senders " + ", ".join(rule.senders))
        return " and ".join(parts)
