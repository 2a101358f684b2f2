"""Node configuration: TOML in, validated dataclasses out.

Every mistake is reported as ``FILE: KEY: what is wrong`` through
:class:`ConfigError`, and the CLI turns that into one line and exit code 2.
Unknown keys are errors, because a misspelt ``netwroks`` silently falling
back to a default is how open relays happen.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .protocol.address import is_ip

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    def __init__(self, file: str | os.PathLike[str], key: str, problem: str) -> None:
        self.file, self.key, self.problem = str(file), key, problem
        super().__init__(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")


_REQUIRED: Any = object()
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


class _Table:
    """A TOML table being read: remembers its key path and which keys were used."""

    def __init__(self, data: Any, path: str, file: Path) -> None:
        if not isinstance(data, dict):
            raise ConfigError(file, path, f"must be a table, not {type(data).__name__}")
        self.data, self.prefix, self.file = data, path, file
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def get(self, name: str, kinds: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        self.used.add(name)
        if name not in self.data:
            if default is _REQUIRED:
                raise self.error(name, "is required")
            return default
        value = self.data[name]
        if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple)
                                                    else (kinds,)):
            raise self.error(name, f"must be {_kind_name(kinds)}, not a boolean")
        if not isinstance(value, kinds):
            raise self.error(name, f"must be {_kind_name(kinds)}, not {type(value).__name__}")
        return value

    def table(self, name: str) -> _Table:
        return _Table(self.get(name, dict, {}), self.key(name), self.file)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def duration(self, name: str, default: str) -> float:
        value = self.get(name, (str, int, float), default)
        seconds = parse_duration(value)
        if seconds is None:
            raise self.error(name, f"is not a duration like '300s', '5m' or '5d': {value!r}")
        return seconds

    def size(self, name: str, default: str | int) -> int:
        value = self.get(name, (str, int), default)
        size = parse_size(value)
        if size is None:
            raise self.error(name, f"is not a size like '10M' or 10240000: {value!r}")
        return size

    def positive_int(self, name: str, default: int) -> int:
        value = self.get(name, int, default)
        if value < 1:
            raise self.error(name, f"must be at least 1; got {value}")
        return value

    def path(self, name: str, default: Any = _REQUIRED, must_exist: bool = True) -> Path | None:
        value = self.get(name, str, default)
        if value is None:
            return None
        path = Path(value)
        if not path.is_absolute():
            path = self.file.parent / path
        if must_exist and not path.exists():
            raise self.error(name, f"file not found: {path}")
        return path

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _kind_name(kinds: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    items = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(names.get(k, k.__name__) for k in items)


def parse_duration(value: str | int | float) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if value >= 0 else None
    match = _DURATION.match(str(value))
    if not match:
        return None
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: str | int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else None
    match = _SIZE.match(str(value))
    if not match:
        return None
    unit = (match.group(2) or "b").lower()[0]
    return int(match.group(1)) * {"b": 1, "k": 1024, "m": 1 << 20, "g": 1 << 30}[unit]


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``v6`` bracketed; raises ValueError with a reason."""
    host, port_text = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unterminated [")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected :PORT after ]")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ValueError("IPv6 addresses must be written as [ADDRESS]:PORT")
    if port_text is None:
        if default_port is None:
            raise ValueError("a port is required (HOST:PORT)")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be a number from 1 to 65535; got {port_text!r}")
    if not host:
        raise ValueError("host is empty")
    return host, int(port_text)


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ListenConfig:
    name: str
    host: str
    port: int
    networks: tuple[IPNetwork, ...] = ()
    tls: TLSFiles | None = None
    auth: str = "none"  # none | optional | required
    users: Path | None = None
    allow_plaintext_auth: bool = False
    require_tls: bool = False
    max_message_size: int = 10_240_000
    max_recipients: int = 1000
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    auth_failure_limit: int = 3  # per session, then 421
    auth_ip_failure_limit: int = 10  # per client address within auth_block_time, then blocked
    auth_block_time: float = 600.0


@dataclass(frozen=True)
class NodeConfig:
    name: str
    hostname: str
    spool: Path
    min_free: int = 64 << 20


@dataclass(frozen=True)
class LogConfig:
    maillog: str = "stderr"  # "stderr", "syslog" or a file path
    json: Path | None = None
    syslog_name: str = "mailhop"


@dataclass(frozen=True)
class QueueConfig:
    lifetime: float = 5 * 86400.0
    min_backoff: float = 300.0
    max_backoff: float = 4200.0
    run_delay: float = 60.0  # how often deferred mail is looked at (Postfix queue_run_delay)
    hold_delivery: bool = False  # accept and queue, deliver nothing (Postfix defer_transports)


TLS_POLICIES = ("none", "may", "encrypt", "verify")
DIRECT = "direct"  # built-in next hop: each recipient domain's MX on port 25


@dataclass(frozen=True)
class NextHopConfig:
    """Where a message goes next, and how to talk to it (Postfix relayhost + smtp_* settings)."""

    name: str
    host: str  # "" for the built-in direct hop: the recipient's domain
    port: int = 25
    mx: bool = True
    tls: str = "may"
    ca_file: Path | None = None
    credentials: Path | None = None
    allow_plaintext_auth: bool = False
    max_connections: int = 10
    max_recipients: int = 50  # per transaction (Postfix smtp_destination_recipient_limit)
    source_address: str | None = None
    max_rate: float | None = None  # messages per second (from "14/s", "50000/d", ...)
    throttle_replies: tuple[str, ...] = ("Throttling", "Maximum sending rate")
    fallback: tuple[str, ...] = ()  # next hops to use while this one is down
    failure_threshold: int = 3  # consecutive connection failures that mark the hop down
    probe_interval: float = 30.0  # how often a down hop is tried again

    @property
    def label(self) -> str:
        if not self.host:
            return "MX of the recipient domain, port 25"
        host = f"[{self.host}]" if not self.mx else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class RouteRule:
    """Recipients matching ``domains`` (and senders matching ``senders``) go to ``hop``."""

    hop: str
    domains: tuple[str, ...] = ()
    senders: tuple[str, ...] = ()
    index: int = 0


@dataclass(frozen=True)
class DeliveryConfig:
    helo_name: str = ""  # default: [node] hostname
    connect_timeout: float = 30.0
    greeting_timeout: float = 300.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0  # RFC 5321 4.5.3.2.6: >= 10 min for the final reply
    idle_time: float = 5.0  # keep an idle connection this long for the next message


@dataclass(frozen=True)
class RelayConfig:
    default: str = DIRECT
    routes: tuple[RouteRule, ...] = ()


@dataclass(frozen=True)
class Config:
    path: Path
    node: NodeConfig
    listeners: tuple[ListenConfig, ...]
    log: LogConfig = field(default_factory=LogConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    nexthops: dict[str, NextHopConfig] = field(default_factory=dict)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    hosts_file: Path | None = None  # [resolver] hosts: static answers, like /etc/hosts
    metrics: tuple[str, int] | None = None  # [metrics] address: /metrics and /healthz


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a node config file; raises :class:`ConfigError`."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(file, "", "is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"invalid TOML: {exc}") from None
    return parse(data, file)


def parse(data: dict[str, Any], file: Path) -> Config:
    top = _Table(data, "", file)
    node = _node(top.table("node"))
    listen_raw = top.get("listen", list, _REQUIRED)
    if not listen_raw:
        raise top.error("listen", "needs at least one [[listen]] table")
    listeners = tuple(_listen(_Table(item, f"listen[{i}]", file), i)
                      for i, item in enumerate(listen_raw))
    seen: set[tuple[str, int]] = set()
    for i, lst in enumerate(listeners):
        if (lst.host, lst.port) in seen:
            raise ConfigError(file, f"listen[{i}].address", "duplicate listen address")
        seen.add((lst.host, lst.port))
    log = _log(top.table("log"))
    queue = _queue(top.table("queue"))
    hops_table = top.table("nexthop")
    nexthops = {name: _nexthop(hops_table.table(name), name) for name in hops_table.data}
    hops_table.used.update(hops_table.data)
    hops_table.done()
    nexthops.setdefault(DIRECT, NextHopConfig(DIRECT, ""))
    for name, hop in nexthops.items():
        for j, other in enumerate(hop.fallback):
            if other not in nexthops or other == name:
                raise ConfigError(file, f"nexthop.{name}.fallback[{j}]",
                                  f"no other [nexthop.{other}] is defined")
    relay = _relay(top, nexthops)
    delivery = _delivery(top.table("delivery"))
    resolver = top.table("resolver")
    hosts_file = resolver.path("hosts", None)
    resolver.done()
    metrics = None
    mt = top.table("metrics")
    if "address" in mt.data:
        try:
            metrics = parse_hostport(mt.get("address", str))
        except ValueError as exc:
            raise mt.error("address", str(exc)) from None
    mt.done()
    top.done()
    return Config(file, node, listeners, log, queue, relay, nexthops, delivery, hosts_file,
                  metrics)


def _node(t: _Table) -> NodeConfig:
    name = t.get("name", str, "mailhop")
    hostname = t.get("hostname", str, "") or socket.getfqdn()
    spool = t.path("spool", "/var/spool/mailhop", must_exist=False)
    assert spool is not None
    min_free = t.size("min_free", "64M")
    t.done()
    return NodeConfig(name, hostname, spool, min_free)


def _listen(t: _Table, index: int) -> ListenConfig:
    address = t.get("address", str)
    try:
        host, port = parse_hostport(address)
    except ValueError as exc:
        raise t.error("address", str(exc)) from None
    networks = []
    for j, text in enumerate(t.get("networks", list, [])):
        if not isinstance(text, str):
            raise t.error(f"networks[{j}]", "must be a string like '10.0.0.0/8'")
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise t.error(f"networks[{j}]", f"invalid CIDR network {text!r}") from None
    tls = None
    if "tls" in t.data:
        tt = t.table("tls")
        cert, key = tt.path("cert"), tt.path("key")
        assert cert is not None and key is not None
        tt.done()
        tls = TLSFiles(cert, key)
    auth = t.choice("auth", ("none", "optional", "required"), "none")
    users = t.path("users", None)
    if auth != "none" and users is None:
        raise t.error("users", f"is required when auth = {auth!r}")
    if users is not None:
        check_private_file(users, t.file, t.key("users"))
    allow_plain = t.get("allow_plaintext_auth", bool, False)
    if auth != "none" and tls is None and not allow_plain:
        raise t.error("auth", "needs tls (AUTH is only offered after STARTTLS) or "
                      "allow_plaintext_auth = true")
    require_tls = t.get("require_tls", bool, False)
    if require_tls and tls is None:
        raise t.error("require_tls", "needs a tls table with cert and key")
    cfg = ListenConfig(
        name=t.get("name", str, f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"),
        host=host, port=port, networks=tuple(networks), tls=tls, auth=auth, users=users,
        allow_plaintext_auth=allow_plain, require_tls=require_tls,
        max_message_size=t.size("max_message_size", 10_240_000),
        max_recipients=t.positive_int("max_recipients", 1000),
        idle_timeout=t.duration("idle_timeout", "300s"),
        data_timeout=t.duration("data_timeout", "10m"),
        max_connections=t.positive_int("max_connections", 1000),
        max_connections_per_ip=t.positive_int("max_connections_per_ip", 50),
        auth_failure_limit=t.positive_int("auth_failure_limit", 3),
        auth_ip_failure_limit=t.positive_int("auth_ip_failure_limit", 10),
        auth_block_time=t.duration("auth_block_time", "10m"),
    )
    if cfg.max_recipients < 100:
        raise t.error("max_recipients", "must be at least 100 (RFC 5321 4.5.3.1.8)")
    t.done()
    return cfg


def _nexthop(t: _Table, name: str) -> NextHopConfig:
    if name == DIRECT:
        raise ConfigError(t.file, t.prefix, f"'{DIRECT}' is built in (the recipient domain's "
                          "MX); pick another name")
    text = t.get("host", str)
    host, mx = text, t.get("mx", bool, True)
    if text.startswith("["):  # [host] means: no MX lookup (Postfix relayhost syntax)
        end = text.find("]")
        if end < 0 or end != len(text) - 1:
            raise t.error("host", f"unterminated [ in {text!r}")
        host, mx = text[1:end], False
    if not host or (any(c in host for c in " /:") and not is_ip(host)):
        raise t.error("host", f"invalid host name {text!r} (give the port in 'port')")
    port = t.get("port", int, 25)
    if not 0 < port < 65536:
        raise t.error("port", f"must be a number from 1 to 65535; got {port}")
    tls = t.choice("tls", TLS_POLICIES, "may")
    credentials = t.path("credentials", None)
    if credentials is not None:
        check_private_file(credentials, t.file, t.key("credentials"))
    source = t.get("source_address", str, None)
    if source is not None:
        try:
            ipaddress.ip_address(source)
        except ValueError:
            raise t.error("source_address", f"not an IP address: {source!r}") from None
    allow_plain = t.get("allow_plaintext_auth", bool, False)
    if credentials is not None and tls == "none" and not allow_plain:
        raise t.error("credentials", "would never be sent: tls = \"none\" and credentials "
                      "go only over TLS (set tls, or allow_plaintext_auth = true)")
    cfg = NextHopConfig(
        name=name, host=host, port=port, mx=mx, tls=tls, ca_file=t.path("ca_file", None),
        credentials=credentials, allow_plaintext_auth=allow_plain,
        max_connections=t.positive_int("max_connections", 10),
        max_recipients=t.positive_int("max_recipients", 50), source_address=source,
        max_rate=_rate(t, "max_rate"),
        throttle_replies=tuple(_strings(t, "throttle_replies"))
        or ("Throttling", "Maximum sending rate"),
        fallback=tuple(_strings(t, "fallback")),
        failure_threshold=t.positive_int("failure_threshold", 3),
        probe_interval=t.duration("probe_interval", "30s"),
    )
    t.done()
    return cfg


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h|d)\s*$")


def _rate(t: _Table, name: str) -> float | None:
    """``"14/s"`` or ``"50000/d"`` as messages per second."""
    text = t.get(name, str, None)
    if text is None:
        return None
    m = _RATE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise t.error(name, f"is not a rate like '14/s' or '50000/d': {text!r}")
    return float(m.group(1)) / {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _relay(top: _Table, nexthops: dict[str, NextHopConfig]) -> RelayConfig:
    t = top.table("relay")
    default = t.get("default", str, DIRECT)
    if default not in nexthops:
        raise t.error("default", f"no [nexthop.{default}] is defined")
    t.done()
    routes = []
    for i, item in enumerate(top.get("route", list, [])):
        r = _Table(item, f"route[{i}]", top.file)
        hop = r.get("hop", str)
        if hop not in nexthops:
            raise r.error("hop", f"no [nexthop.{hop}] is defined")
        domains = tuple(d.lower().rstrip(".") for d in _strings(r, "domains"))
        senders = tuple(s.lower() for s in _strings(r, "senders"))
        if not domains and not senders:
            raise r.error("domains", "a route needs domains, senders or both")
        r.done()
        routes.append(RouteRule(hop, domains, senders, i))
    return RelayConfig(default, tuple(routes))


def _strings(t: _Table, name: str) -> list[str]:
    items = t.get(name, list, [])
    for j, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise t.error(f"{name}[{j}]", "must be a non-empty string")
    return items


def _delivery(t: _Table) -> DeliveryConfig:
    cfg = DeliveryConfig(
        helo_name=t.get("helo_name", str, ""),
        connect_timeout=t.duration("connect_timeout", "30s"),
        greeting_timeout=t.duration("greeting_timeout", "300s"),
        command_timeout=t.duration("command_timeout", "300s"),
        data_timeout=t.duration("data_timeout", "600s"),
        idle_time=t.duration("idle_time", "5s"),
    )
    t.done()
    return cfg


def _log(t: _Table) -> LogConfig:
    maillog = t.get("maillog", str, "stderr")
    if maillog not in ("stderr", "syslog"):
        path = Path(maillog)
        maillog = str(path if path.is_absolute() else t.file.parent / path)
    cfg = LogConfig(maillog=maillog, json=t.path("json", None, must_exist=False),
                    syslog_name=t.get("syslog_name", str, "mailhop"))
    t.done()
    return cfg


def _queue(t: _Table) -> QueueConfig:
    cfg = QueueConfig(
        lifetime=t.duration("lifetime", "5d"),
        min_backoff=t.duration("min_backoff", "5m"),
        max_backoff=t.duration("max_backoff", "70m"),
        run_delay=t.duration("run_delay", "60s"),
        hold_delivery=t.get("hold_delivery", bool, False),
    )
    if cfg.max_backoff < cfg.min_backoff:
        raise t.error("max_backoff", "must not be smaller than min_backoff")
    t.done()
    return cfg


def check_private_file(path: Path, file: Path | str, key: str) -> None:
    """Secrets must be readable only by their owner (chmod 600), like ssh keys."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(file, key, f"{path} is readable by others "
                          f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
