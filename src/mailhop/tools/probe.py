"""``mailhop probe``: the seed's reachability experiment as one command.

The seed post ran the same test from Shanghai and from Tokyo and compared
maillogs to learn that the IPv6 path to Gmail was unreachable while IPv4
worked.  The probe does that comparison itself: it resolves the target
(MX unless a port is given or the host is bracketed), then walks **every
address of both families** separately — TCP connect, greeting, EHLO,
STARTTLS with certificate details and verification, AUTH with the given
credentials (never printing the secret), optionally a real test message —
and ends with a verdict per family.  Exit status 0 only if a working path
exists.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import DeliveryConfig, NextHopConfig
from ..delivery.client import ClientProtocol, DeliveryError, HopConnection
from ..delivery.connect import ConnectFailed, connect_staggered, family_of
from ..delivery.credentials import Credentials
from ..delivery.resolver import LookupFailed, Resolver, Target
from ..protocol.client import ClientConnection


@dataclass
class AddressReport:
    host: str
    address: str
    port: int
    family: str
    connect: str = ""
    connect_ms: float | None = None
    greeting: str = ""
    capabilities: list[str] = field(default_factory=list)
    tls: dict[str, str] = field(default_factory=dict)
    auth: str = ""
    send: str = ""
    error: str = ""
    total_ms: float = 0.0
    ok: bool = False


@dataclass
class ProbeReport:
    target: str
    port: int
    mx: bool
    resolution: list[str] = field(default_factory=list)
    addresses: list[AddressReport] = field(default_factory=list)
    verdict: str = ""
    ok: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _cert_details(der: bytes | None) -> dict[str, str]:
    if not der:
        return {}
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")}


async def _session(hop: NextHopConfig, settings: DeliveryConfig, target: Target,
                   address: str, helo: str) -> tuple[HopConnection, float]:
    conn = ClientConnection(helo)
    result = await connect_staggered([address], hop.port, lambda: ClientProtocol(conn),
                                     timeout=settings.connect_timeout)
    proto = result.protocol
    assert isinstance(proto, ClientProtocol)
    return HopConnection(hop, settings, target, address, proto, helo), result.seconds


async def probe_address(hop: NextHopConfig, settings: DeliveryConfig, target: Target,
                        address: str, helo: str, credentials: Credentials | None,
                        mail: tuple[str, str] | None) -> AddressReport:
    rep = AddressReport(target.host, address, hop.port,
                        "IPv6" if family_of(address) == 6 else "IPv4")
    started = time.monotonic()
    hc: HopConnection | None = None
    try:
        try:
            hc, seconds = await _session(hop, settings, target, address, helo)
        except ConnectFailed as exc:
            rep.connect = f"failed: {exc.errors[0][1] if exc.errors else exc}"
            rep.error = rep.connect
            return rep
        rep.connect, rep.connect_ms = "ok", round(seconds * 1000, 1)
        rep.greeting = (await hc.greeting()).text
        await hc.hello()
        rep.capabilities = list(hc.conn.caps.names)
        if hc.conn.caps.starttls and hop.tls != "none":
            verify = hop.tls == "verify"
            try:
                await hc.starttls()
                rep.tls["verification"] = "ok" if verify else "not checked (tls = encrypt)"
            except DeliveryError as exc:
                if not verify:
                    raise
                # Record why verification failed, then look at the certificate anyway.
                rep.tls["verification"] = f"FAILED: {' '.join(exc.reply.lines)}"
                hc.close(quit=False)
                relaxed = NextHopConfig(**{**asdict(hop), "tls": "encrypt"})
                hc, _ = await _session(relaxed, settings, target, address, helo)
                await hc.greeting()
                await hc.hello()
                await hc.starttls()
            info = hc.tls_info
            if info is not None:
                cipher = info.cipher()
                rep.tls.update({"protocol": info.version() or "?",
                                "cipher": cipher[0] if cipher else "?"})
                rep.tls.update(_cert_details(info.getpeercert(binary_form=True)))
        elif hop.tls in ("encrypt", "verify"):
            rep.tls["verification"] = "FAILED: STARTTLS not offered"
        if credentials is not None:
            try:
                await hc.authenticate(credentials)
                rep.auth = f"ok (user {credentials.user})"
            except DeliveryError as exc:
                rep.auth = f"failed: {' '.join(exc.reply.lines)}"
        if mail is not None:
            sender, rcpt = mail
            data = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: mailhop probe\r\n"
                    f"Message-ID: <probe.{time.time_ns()}@{helo}>\r\n\r\n"
                    f"Test message from mailhop probe via {address}.\r\n").encode()
            tx = await hc.send(sender, {}, [rcpt], data)
            [result] = tx.results()
            rep.send = f"{result.status}: {result.reply.text}"
        failed_tls = rep.tls.get("verification", "").startswith("FAILED")
        rep.ok = (not failed_tls and not rep.auth.startswith("failed")
                  and not rep.send.startswith(("deferred", "bounced")))
    except DeliveryError as exc:
        rep.error = " ".join(exc.reply.lines)
    finally:
        if hc is not None:
            hc.close()
        rep.total_ms = round((time.monotonic() - started) * 1000, 1)
    return rep


def parse_target(text: str) -> tuple[str, int | None, bool]:
    """``host``, ``host:port``, ``[host]`` or ``[host]:port`` -> host, port, mx."""
    if text.startswith("["):
        end = text.index("]")
        host, rest = text[1:end], text[end + 1 :]
        return host, int(rest[1:]) if rest.startswith(":") else None, False
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port), False
    return text, None, True


async def probe(hop: NextHopConfig, settings: DeliveryConfig, resolver: Resolver, helo: str,
                credentials: Credentials | None = None,
                mail: tuple[str, str] | None = None) -> ProbeReport:
    report = ProbeReport(hop.host, hop.port, hop.mx)
    try:
        targets = await resolver.targets(hop.host, hop.mx)
    except LookupFailed as exc:
        report.verdict = f"no working path: {exc}"
        return report
    for t in targets:
        prefix = f"MX {t.preference} " if hop.mx else ""
        report.resolution.append(f"{prefix}{t.host}: {', '.join(t.addresses) or 'no address'}")
    for t in targets:
        for address in sorted(t.addresses, key=lambda a: -family_of(a)):  # IPv6 first
            report.addresses.append(await probe_address(hop, settings, t, address, helo,
                                                        credentials, mail))
    report.ok = any(a.ok for a in report.addresses)
    report.verdict = verdict(report)
    return report


def verdict(report: ProbeReport) -> str:
    parts = []
    for family in ("IPv6", "IPv4"):
        tried = [a for a in report.addresses if a.family == family]
        if not tried:
            continue
        good = [a for a in tried if a.ok]
        if good:
            parts.append(f"{family} works ({good[0].host}[{good[0].address}])")
        else:
            why = (tried[0].error or tried[0].tls.get("verification") or tried[0].auth
                   or tried[0].send).removeprefix("failed: ").removeprefix("FAILED: ")
            parts.append(f"{family} fails ({why})")
    head = "working path exists" if report.ok else "NO working path"
    return f"{head}: " + "; ".join(parts) if parts else f"{head}: no addresses"


def render(report: ProbeReport) -> str:
    kind = "MX lookup" if report.mx else "A/AAAA lookup, no MX"
    out = [f"probe {report.target} port {report.port} ({kind})"]
    out += [f"  resolved {line}" for line in report.resolution]
    for a in report.addresses:
        out.append(f"  {a.family} {a.host}[{a.address}]:{a.port}")
        out.append(f"    connect   {a.connect}" + (f" in {a.connect_ms} ms"
                                                   if a.connect_ms is not None else ""))
        if a.greeting:
            out.append(f"    greeting  {a.greeting}")
        if a.capabilities:
            out.append(f"    EHLO      {' '.join(a.capabilities)}")
        if a.tls:
            tls = a.tls
            if "protocol" in tls:
                out.append(f"    STARTTLS  {tls['protocol']} {tls['cipher']}")
                out.append(f"    cert      subject {tls.get('subject', '?')}")
                out.append(f"              issuer {tls.get('issuer', '?')}, "
                           f"expires {tls.get('not_after', '?')}")
            out.append(f"    verify    {tls.get('verification', '')}")
        if a.auth:
            out.append(f"    AUTH      {a.auth}")
        if a.send:
            out.append(f"    send      {a.send}")
        if a.error and a.error != a.connect:
            out.append(f"    error     {a.error}")
        out.append(f"    result    {'OK' if a.ok else 'FAILED'} in {a.total_ms} ms")
    out.append(f"verdict: {report.verdict}")
    return "\n".join(out)


def run(hops: list[tuple[NextHopConfig, Credentials | None]], settings: DeliveryConfig,
        hosts_file: Path | None, helo: str,
        mail: tuple[str, str] | None) -> list[ProbeReport]:
    async def main() -> list[ProbeReport]:
        resolver = Resolver(hosts_file)
        return [await probe(hop, settings, resolver, helo, creds, mail) for hop, creds in hops]
    return asyncio.run(main())
