"""Envelope address and ESMTP parameter parsing (RFC 5321 4.1.2, RFC 6531).

Addresses are validated, never rewritten: the local part is relayed byte
for byte (RFC 5321 2.4 says it is case-sensitive).  Anything that could
break out of a header or a command line (CR, LF, NUL, other controls) is a
syntax error here, so no later stage has to think about it.
"""

from __future__ import annotations

import ipaddress
import re

MAX_PATH = 256  # RFC 5321 4.5.3.1.3
MAX_LOCAL = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING = re.compile(rf"^[{_ATEXT}]+(\.[{_ATEXT}]+)*$")
_DOT_STRING_UTF8 = re.compile(rf"^[{_ATEXT}\u0080-\U0010ffff]+(\.[{_ATEXT}\u0080-\U0010ffff]+)*$")
_QUOTED = re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_QUOTED_UTF8 = re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"$')
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9\-]*[A-Za-z0-9])?$")
_LABEL_UTF8 = re.compile(r"^[A-Za-z0-9\u0080-\U0010ffff]([A-Za-z0-9\-\u0080-\U0010ffff]*"
                         r"[A-Za-z0-9\u0080-\U0010ffff])?$")
_PARAM_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]*$")


class AddressError(ValueError):
    """Raised with a short human reason; the engine picks the reply code."""


_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


def _has_controls(text: str) -> bool:
    return _CONTROLS.search(text) is not None


def needs_utf8(text: str) -> bool:
    return not text.isascii()


def valid_domain(domain: str, utf8: bool = False) -> bool:
    if not domain or len(domain) > MAX_DOMAIN:
        return False
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            if literal.lower().startswith("ipv6:"):
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            return False
        return True
    label = _LABEL_UTF8 if utf8 else _LABEL
    return all(label.match(part) and len(part) <= 63 for part in domain.split("."))


# The common case in one regex: ASCII dot-string local part, ASCII host name.
_SIMPLE = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*@[A-Za-z0-9](?:[A-Za-z0-9\-]{{0,61}}"
                     rf"[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{{0,61}}[A-Za-z0-9])?)*")


def validate_mailbox(address: str, utf8: bool = False) -> None:
    """Raise :class:`AddressError` unless ``address`` is ``local@domain``."""
    if (_SIMPLE.fullmatch(address) and address.index("@") <= MAX_LOCAL
            and len(address) - address.index("@") <= MAX_DOMAIN + 1):
        return  # what the checks below would accept, without their per-label work
    if _has_controls(address):
        raise AddressError("control characters in address")
    if not utf8 and needs_utf8(address):
        raise AddressError("non-ASCII address without SMTPUTF8")
    local, at, domain = address.rpartition("@")
    if not at or not local:
        raise AddressError("address must be local-part@domain")
    if len(local.encode()) > MAX_LOCAL and not local.startswith('"'):
        raise AddressError("local part too long")
    dot = _DOT_STRING_UTF8 if utf8 else _DOT_STRING
    quoted = _QUOTED_UTF8 if utf8 else _QUOTED
    if not (dot.match(local) or quoted.match(local)):
        raise AddressError("invalid local part")
    if not valid_domain(domain, utf8):
        raise AddressError("invalid domain")


def split_path(arg: str) -> tuple[str, str]:
    """Split ``<path> params`` at the closing bracket, honouring quoted local parts."""
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        raise AddressError("path must be enclosed in <>")
    if '"' not in arg:  # no quoted local part: the first ">" closes the path
        close = arg.find(">")
        if close < 0:
            raise AddressError("unterminated path")
        rest = arg[close + 1 :]
        if rest and not rest.startswith(" "):
            raise AddressError("garbage after path")
        return arg[1:close], rest.strip(" ")
    quoted = escaped = False
    for i in range(1, len(arg)):
        ch = arg[i]
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            rest = arg[i + 1 :]
            if rest and not rest.startswith(" "):
                raise AddressError("garbage after path")
            return arg[1:i], rest.strip(" ")
    raise AddressError("unterminated path")


def strip_source_route(path: str) -> str:
    """RFC 5321 4.1.1.3: source routes SHOULD be accepted and ignored."""
    if path.startswith("@"):
        colon = path.find(":")
        if colon < 0:
            raise AddressError("invalid source route")
        return path[colon + 1 :]
    return path


def parse_params(text: str) -> dict[str, str | None]:
    """Parse ``KEY=VALUE KEY`` parameters; keys are upper-cased, values kept."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _PARAM_KEY.match(key) or (eq and not value) or _has_controls(value):
            raise AddressError(f"invalid parameter {item[:40]!r}")
        key = key.upper()
        if key in params:
            raise AddressError(f"duplicate parameter {key}")
        params[key] = value if eq else None
    return params


def parse_mail_arg(arg: str) -> tuple[str, dict[str, str | None]]:
    """Parse the argument of ``MAIL FROM:``; ``""`` is the null sender."""
    path, rest = split_path(arg)
    params = parse_params(rest)
    if len(path) + 2 > MAX_PATH:
        raise AddressError("path too long")
    address = strip_source_route(path)
    if address:
        validate_mailbox(address, utf8="SMTPUTF8" in params)
    return address, params


def parse_rcpt_arg(arg: str, utf8: bool) -> tuple[str, dict[str, str | None]]:
    """Parse the argument of ``RCPT TO:``; ``<postmaster>`` alone is allowed."""
    path, rest = split_path(arg)
    params = parse_params(rest)
    if len(path) + 2 > MAX_PATH:
        raise AddressError("path too long")
    address = strip_source_route(path)
    if address.lower() == "postmaster":
        return address, params
    if not address:
        raise AddressError("empty recipient")
    validate_mailbox(address, utf8=utf8)
    return address, params


def is_ip(text: str) -> bool:
    """An IPv4 or IPv6 address literal (without brackets)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
