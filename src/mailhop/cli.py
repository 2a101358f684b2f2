"""The ``mailhop`` command line.

User mistakes (a bad config, a missing spool, an unknown queue ID) end in
one clear line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, load

EXIT_USAGE = 2


class CLIError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _load(path: str) -> Config:
    return load(path)


def cmd_serve(args: argparse.Namespace) -> int:
    from .node import run
    from .spool.store import SpoolLocked

    cfg = _load(args.config)
    try:
        run(cfg)
    except SpoolLocked as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(f"cannot start: {exc.strerror or exc}") from None
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    from .smtpd.auth import UserDB, UserFileError
    from .smtpd.listener import server_tls_context

    for i, lst in enumerate(cfg.listeners):
        if lst.tls is not None:
            try:
                server_tls_context(str(lst.tls.cert), str(lst.tls.key))
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConfigError(cfg.path, f"listen[{i}].tls", f"cannot load certificate/key: "
                                  f"{exc}") from None
        if lst.users is not None:
            try:
                UserDB.load(lst.users)
            except UserFileError as exc:
                raise ConfigError(cfg.path, f"listen[{i}].users", str(exc)) from None
    from .delivery.credentials import CredentialsError, load_credentials

    for name, hop in cfg.nexthops.items():
        if hop.credentials is not None:
            try:
                load_credentials(hop.credentials, hop.host, hop.port, hop.mx)
            except CredentialsError as exc:
                raise ConfigError(cfg.path, f"nexthop.{name}.credentials", str(exc)) from None
    hops = ", ".join(f"{h.name} -> {h.label}" for h in cfg.nexthops.values()
                     if h.name == cfg.relay.default or any(r.hop == h.name
                                                           for r in cfg.relay.routes))
    print(f"{cfg.path}: ok ({len(cfg.listeners)} listener(s), spool {cfg.node.spool}; "
          f"next hops: {hops})")
    return 0


def _spool_dir(args: argparse.Namespace) -> Path:
    if args.spool:
        return Path(args.spool)
    if args.config:
        return _load(args.config).node.spool
    raise CLIError("give -c CONFIG or --spool DIR", EXIT_USAGE)


def _reader(args: argparse.Namespace):
    from .spool.store import SpoolReader

    try:
        return SpoolReader(_spool_dir(args))
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None


def cmd_queue_list(args: argparse.Namespace) -> int:
    reader = _reader(args)
    try:
        messages = list(reader.messages())
    finally:
        reader.close()
    if args.json:
        out = [{
            "queue_id": m.queue_id, "arrival": m.arrival, "size": m.size,
            "sender": m.envelope.sender, "held": m.held,
            "recipients": [{"address": r.address, "state": r.state.value,
                            "attempts": r.attempts, "next_attempt": r.next_attempt,
                            "last_reply": r.last_reply} for r in m.envelope.recipients],
        } for m in messages]
        print(json.dumps(out, indent=2))
        return 0
    if not messages:
        print("Mail queue is empty")
        return 0
    print(f"{'-Queue ID-':<15}{'--Size--':>9} {'----Arrival Time----':<20} -Sender/Recipient-")
    for m in messages:
        mark = "!" if m.held else ""
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(m.arrival))
        print(f"{m.queue_id + mark:<15}{m.size:>9} {arrival:<20} {m.envelope.sender or '<>'}")
        for r in m.envelope.recipients:
            if r.last_reply:
                print(f"{'':<46}({r.last_reply[:70]})")
            print(f"{'':<46}{r.address}  [{r.state.value}]")
        print()
    print(f"-- {sum(m.size for m in messages) // 1024} Kbytes in {len(messages)} Requests.")
    return 0


def cmd_queue_show(args: argparse.Namespace) -> int:
    reader = _reader(args)
    try:
        msg = reader.get(args.queue_id)
        body = reader.body(args.queue_id) if msg else None
    finally:
        reader.close()
    if msg is None or body is None:
        raise CLIError(f"{args.queue_id}: no such message in the queue")
    env = msg.envelope
    print(f"queue_id: {msg.queue_id}")
    print(f"arrival: {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(msg.arrival))}")
    print(f"size: {msg.size}")
    print(f"sender: <{env.sender}>")
    for r in env.recipients:
        print(f"recipient: <{r.address}> state={r.state.value} attempts={r.attempts}"
              + (f" last_reply={r.last_reply!r}" if r.last_reply else ""))
    print(f"client: {env.client_name}[{env.client_addr}] helo={env.helo} "
          f"protocol={env.protocol}" + (f" auth={env.auth_user}" if env.auth_user else ""))
    if env.sender_params:
        print("mail_params: " + " ".join(k if v is None else f"{k}={v}"
                                         for k, v in env.sender_params.items()))
    print()
    end = body.find(b"\r\n\r\n")
    headers = body if end < 0 else body[: end + 2]
    sys.stdout.write(headers.decode("utf-8", "replace").replace("\r\n", "\n"))
    if args.body and end >= 0:
        sys.stdout.write("\n" + body[end + 4 :].decode("utf-8", "replace").replace("\r\n", "\n"))
    return 0


def cmd_queue_control(args: argparse.Namespace) -> int:
    """flush/hold/release/delete/requeue: through the running node, or directly if stopped."""
    from . import control
    from .spool import ops

    spool = _spool_dir(args)
    ids = args.ids or [ops.ALL]
    if args.queue_command != "flush" and not args.ids:
        raise CLIError(f"queue {args.queue_command}: give queue IDs or ALL", EXIT_USAGE)
    if not (spool / "spool.db").exists():
        raise CLIError(f"no spool at {spool}")
    try:
        reply = control.request(spool, {"action": args.queue_command, "ids": ids})
    except OSError:
        reply = None  # no node is running: apply the change to the spool ourselves
    if reply is None:
        done = _queue_control_offline(spool, args.queue_command, ids)
        where = "spool (node not running)"
    elif not reply.get("ok"):
        raise CLIError(f"node refused: {reply.get('error')}")
    else:
        done, where = reply["ids"], "running node"
    verb = {"flush": "flushed", "hold": "held", "release": "released", "delete": "deleted",
            "requeue": "requeued"}[args.queue_command]
    print(f"{verb} {len(done)} message(s) via {where}" + (": " + " ".join(done) if done and
                                                           len(done) <= 20 else ""))
    missing = [i for i in ids if i != ops.ALL and i.upper() not in done]
    if missing and args.queue_command != "flush":
        print(f"mailhop: not found (or not in a state to {args.queue_command}): "
              + " ".join(missing), file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _offline_spool(spool: Path) -> Iterator[tuple[sqlite3.Connection, bool]]:
    """The spool's database for a tool, and whether a node is running on it.

    When no node runs, the node's lock is held for the duration, so none can
    start while the tool changes the spool."""
    import fcntl

    if not (spool / "spool.db").exists():
        raise CLIError(f"no spool at {spool}")
    fd = os.open(spool / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            running = False
        except BlockingIOError:
            running = True
        db = sqlite3.connect(spool / "spool.db", isolation_level=None, timeout=10)
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            yield db, running
        finally:
            db.close()
    finally:
        os.close(fd)


def cmd_queue_check(args: argparse.Namespace) -> int:
    from .spool.check import find_problems, repair

    spool = _spool_dir(args)
    with _offline_spool(spool) as (db, running):
        if args.repair and running:
            raise CLIError("stop the node before --repair (checking alone is safe while it runs)")
        problems = find_problems(db, spool)
        for p in problems:
            print(f"{p.queue_id}: {p.kind}: {p.detail}")
        if args.repair and problems:
            db.execute("BEGIN IMMEDIATE")
            done = repair(db, spool, problems)
            db.execute("COMMIT")
            print("\n".join(done))
            print(f"repaired {len(done)} problem(s)")
            return 0
    print(f"spool {spool}: " + ("ok" if not problems else f"{len(problems)} problem(s); "
                                "run with --repair to fix them"))
    return 0 if not problems else 1


def _queue_control_offline(spool: Path, action: str, ids: list[str]) -> list[str]:
    from .spool import ops

    with _offline_spool(spool) as (db, running):
        if running:
            raise CLIError("the node is running but its control socket does not answer")
        db.execute("BEGIN IMMEDIATE")
        if action == "delete":
            done = ops.delete(db, ids, spool / "bodies")
        else:
            done = ops.ACTIONS[action](db, ids)
        db.execute("COMMIT")
    return done


def cmd_route(args: argparse.Namespace) -> int:
    from .delivery.router import Router

    cfg = _load(args.config)
    decision = Router(cfg.relay).route(args.address, args.sender or "")
    hop = cfg.nexthops[decision.hop]
    if args.json:
        print(json.dumps({"address": args.address, "hop": hop.name, "target": hop.label,
                          "tls": hop.tls, "why": decision.why}))
    else:
        print(f"{args.address} -> {hop.name} ({hop.label}, tls={hop.tls})")
        print(f"  because: {decision.why}")
    return 0


def _server(args: argparse.Namespace) -> tuple[str, int]:
    """Where local submission goes: --server, else the config's first listener."""
    from .config import parse_hostport

    if args.server:
        try:
            return parse_hostport(args.server, 25)
        except ValueError as exc:
            raise CLIError(f"--server: {exc}", EXIT_USAGE) from None
    if args.config:
        lst = _load(args.config).listeners[0]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(lst.host, lst.host)
        return host, lst.port
    return "127.0.0.1", 2525


def _submit(args: argparse.Namespace, sender: str, rcpts: list[str], data: bytes) -> int:
    from .tools.submit import SubmitError, run_submit

    try:
        result = run_submit(_server(args), sender, rcpts, data)
    except SubmitError as exc:
        raise CLIError(str(exc), exc.code) from None
    for line in result.rejected:
        print(f"mailhop: recipient refused: {line}", file=sys.stderr)
    if args.verbose:
        print(f"queued as {result.queue_id} for {', '.join(result.accepted)}")
    return 69 if result.rejected else 0


def cmd_sendmail(args: argparse.Namespace) -> int:
    from .tools.submit import SubmitError, build_sendmail_message, check_address, default_sender

    try:
        sender = check_address(args.f, "sender") if args.f else default_sender()
        data, rcpts = build_sendmail_message(
            sys.stdin.buffer.read(), sender, args.F, args.recipients, args.t,
            dot_ends=not (args.i or args.oi))
    except SubmitError as exc:
        raise CLIError(str(exc), exc.code) from None
    return _submit(args, sender, rcpts, data)


def cmd_send(args: argparse.Namespace) -> int:
    from .tools.submit import SubmitError, build_mail_message, check_address, default_sender

    try:
        sender = check_address(args.r, "sender") if args.r else default_sender()
        rcpts = [check_address(r, "recipient") for r in args.recipients]
    except SubmitError as exc:
        raise CLIError(str(exc), exc.code) from None
    data = build_mail_message(args.s, sender, rcpts, sys.stdin.buffer.read())
    return _submit(args, sender, rcpts, data)


def cmd_trace(args: argparse.Namespace) -> int:
    from .tools.trace import LogIndex, as_dict, render

    logs = [Path(p) for p in args.log]
    for path in logs:
        if not path.exists():
            raise CLIError(f"--log {path}: no such file or directory", EXIT_USAGE)
    index = LogIndex(logs)
    hops = index.trace(args.id)
    if not hops:
        raise CLIError(f"{args.id}: not found in {', '.join(map(str, logs))}")
    final = index.final_id(hops)
    if args.json:
        print(json.dumps({"hops": as_dict(hops), "final_queue_id": final}, indent=2))
    else:
        print(render(hops, final, lines=args.lines))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    import socket

    from .config import TLS_POLICIES, DeliveryConfig, NextHopConfig
    from .delivery.credentials import CredentialsError, load_credentials
    from .tools import probe

    if (args.mail_from is None) != (args.mail_to is None):
        raise CLIError("--from and --to go together", EXIT_USAGE)
    mail = (args.mail_from, args.mail_to) if args.mail_from else None
    settings = DeliveryConfig(connect_timeout=args.timeout, greeting_timeout=args.timeout,
                              command_timeout=args.timeout, data_timeout=max(args.timeout, 60))
    hops: list[tuple[NextHopConfig, object]] = []
    hosts = Path(args.hosts) if args.hosts else None
    helo = args.helo or socket.getfqdn()
    try:
        if args.config:
            cfg = _load(args.config)
            hosts = hosts or cfg.hosts_file
            helo = args.helo or cfg.delivery.helo_name or cfg.node.hostname
            for hop in cfg.nexthops.values():
                if not hop.host:
                    continue  # "direct" has no single target to probe
                creds = (load_credentials(hop.credentials, hop.host, hop.port, hop.mx)
                         if hop.credentials else None)
                hops.append((hop, creds))
        if args.target:
            host, port, mx = probe.parse_target(args.target)
            if args.tls not in TLS_POLICIES:
                raise CLIError(f"--tls must be one of {', '.join(TLS_POLICIES)}", EXIT_USAGE)
            hop = NextHopConfig("probe", host, port or 25, mx=mx, tls=args.tls,
                                ca_file=Path(args.ca_file) if args.ca_file else None)
            creds = None
            if args.credentials:
                from .config import check_private_file

                check_private_file(Path(args.credentials), args.credentials, "--credentials")
                creds = load_credentials(Path(args.credentials), host, hop.port, mx)
            hops.append((hop, creds))
    except (ValueError, CredentialsError, OSError) as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    if not hops:
        raise CLIError("give HOST[:PORT] or --config FILE", EXIT_USAGE)
    reports = probe.run(hops, settings, hosts, helo, mail)  # type: ignore[arg-type]
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        print("\n\n".join(probe.render(r) for r in reports))
    return 0 if all(r.ok for r in reports) else 1


def cmd_import_postfix(args: argparse.Namespace) -> int:
    from .tools.import_postfix import convert

    directory = Path(args.directory)
    if not (directory / "main.cf").exists():
        raise CLIError(f"{directory}: no main.cf here", EXIT_USAGE)
    try:
        result = convert(directory)
    except (OSError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    if args.output:
        Path(args.output).write_text(result.toml)
        print(f"wrote {args.output}; check it with: mailhop check-config -c {args.output}")
    else:
        sys.stdout.write(result.toml)
    for warning in result.warnings:
        print(f"mailhop: note: {warning}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from . import control

    spool = _spool_dir(args)
    try:
        reply = control.request(spool, {"action": "status"})
    except OSError:
        raise CLIError(f"no node is running on {spool}") from None
    if not reply.get("ok"):
        raise CLIError(f"node refused: {reply.get('error')}")
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    print(f"node {reply['node']}: " + ("healthy" if not reply["health"] else
                                       "UNHEALTHY: " + "; ".join(reply["health"])))
    queue = reply["queue"]
    print("queue: " + ", ".join(f"{k} {queue.get(k, 0)}" for k in ("queued", "deferred")))
    print(f"{'hop':<12} {'state':<10} {'target':<42} {'rate':>12} {'queued':>7} {'conns':>5}"
          "  last error")
    for name, h in reply["hops"].items():
        rate = ("-" if h["max_rate"] is None else
                f"{h['current_rate']:.3g}/{h['max_rate']:.3g}/s")
        print(f"{name:<12} {h['state']:<10} {h['target']:<42} {rate:>12} {h['queued_jobs']:>7} "
              f"{h['connections']:>5}  {h['last_error'][:80]}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import run

    if args.messages < 1:
        raise CLIError("--messages must be at least 1", EXIT_USAGE)
    return run(args.messages, args.keep, args.timeout)


def cmd_passwd(args: argparse.Namespace) -> int:
    from .smtpd.auth import UserFileError, set_password

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {args.user}: ")
        if password != getpass.getpass("Again: "):
            raise CLIError("passwords do not match")
    if not password:
        raise CLIError("empty password", EXIT_USAGE)
    try:
        set_password(Path(args.file), args.user, password)
    except (UserFileError, OSError) as exc:
        raise CLIError(str(exc)) from None
    print(f"{args.file}: password set for {args.user}")
    return 0


def _spool_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config")
    p.add_argument("--spool", help="spool directory (instead of -c)")


def _submission_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="HOST:PORT of the node (default: from -c, or "
                   "127.0.0.1:2525)")
    p.add_argument("-c", "--config")
    p.add_argument("-v", "--verbose", action="store_true", help="print the queue ID")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailhop", description="Store-and-forward SMTP relay")
    parser.add_argument("--version", action="version", version=f"mailhop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the seed's chain (ingress, egress, SES stand-in) "
                       "on this machine and send mail through it")
    p.add_argument("--messages", type=int, default=3)
    p.add_argument("--keep", action="store_true", help="leave the three nodes running")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("probe", help="test every address of a next hop: connect, EHLO, "
                       "STARTTLS, AUTH")
    p.add_argument("target", nargs="?", help="HOST (MX lookup), HOST:PORT or [HOST]:PORT")
    p.add_argument("-c", "--config", help="probe every next hop of this node config")
    p.add_argument("--credentials", help="user:password or sasl_passwd file (mode 0600)")
    p.add_argument("--tls", default="verify", help="none, may, encrypt or verify (default)")
    p.add_argument("--ca-file", help="CA certificates to verify against (default: system)")
    p.add_argument("--hosts", help="static name answers, /etc/hosts format")
    p.add_argument("--helo", help="name to send in EHLO")
    p.add_argument("--from", dest="mail_from", help="also send a test message from this")
    p.add_argument("--to", dest="mail_to", help="... to this recipient")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per step")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("import-postfix", help="print a mailhop config equivalent to a Postfix "
                       "relay's main.cf/master.cf/sasl_passwd")
    p.add_argument("directory", help="the Postfix config directory, e.g. /etc/postfix")
    p.add_argument("-o", "--output", help="write the TOML here instead of stdout")
    p.set_defaults(func=cmd_import_postfix)

    p = sub.add_parser("serve", help="run a node")
    p.add_argument("-c", "--config", required=True, help="node config (TOML)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a node config and exit")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_check_config)

    q = sub.add_parser("queue", help="inspect the queue").add_subparsers(
        dest="queue_command", required=True, metavar="ACTION")
    for name, func, helptext in (("list", cmd_queue_list, "list queued messages (like mailq)"),
                                 ("show", cmd_queue_show, "show one message")):
        p = q.add_parser(name, help=helptext)
        _spool_options(p)
        if name == "list":
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("queue_id")
            p.add_argument("--body", action="store_true", help="print the body too")
        p.set_defaults(func=func)

    p = q.add_parser("check", help="verify the spool (bodies, recipients) and optionally "
                     "repair it")
    _spool_options(p)
    p.add_argument("--repair", action="store_true", help="fix what can be fixed (node stopped)")
    p.set_defaults(func=cmd_queue_check)

    for name, helptext in (("flush", "retry deferred mail now"),
                           ("hold", "put messages on hold (ID ... or ALL)"),
                           ("release", "release held messages"),
                           ("delete", "delete messages (ID ... or ALL)"),
                           ("requeue", "requeue messages for immediate delivery")):
        p = q.add_parser(name, help=helptext)
        _spool_options(p)
        p.add_argument("ids", nargs="*", metavar="ID")
        p.set_defaults(func=cmd_queue_control)

    p = sub.add_parser("status", help="a running node's next hops: state, last error, pace, "
                       "queue")
    _spool_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("route", help="show which next hop a recipient would take, and why")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("address")
    p.add_argument("--sender", help="envelope sender (for sender-based routes)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("sendmail", help="submit a message from stdin (sendmail compatible)")
    p.add_argument("-t", action="store_true", help="take recipients from To:/Cc:/Bcc:")
    p.add_argument("-i", action="store_true", help="a line with a single dot is not the end")
    p.add_argument("-oi", action="store_true", help="same as -i")
    p.add_argument("-f", metavar="SENDER", help="envelope sender")
    p.add_argument("-F", metavar="NAME", help="full name for a From: header we add")
    p.add_argument("recipients", nargs="*")
    _submission_options(p)
    p.set_defaults(func=cmd_sendmail)

    p = sub.add_parser("send", help="send a text message, like mail -s (body on stdin)")
    p.add_argument("-s", metavar="SUBJECT", default="", help="subject")
    p.add_argument("-r", metavar="FROM", help="sender address")
    p.add_argument("recipients", nargs="+")
    _submission_options(p)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("trace", help="follow a message hop by hop through maillogs")
    p.add_argument("id", help="queue ID or Message-ID")
    p.add_argument("--log", action="append", required=True,
                   help="a maillog file or directory (repeat for each node)")
    p.add_argument("--lines", action="store_true", help="also print the raw log lines")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("passwd", help="set a password in an AUTH users file")
    p.add_argument("file")
    p.add_argument("user")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=cmd_passwd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"mailhop: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CLIError as exc:
        print(f"mailhop: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
