"""The ``mailhop`` command line.

User mistakes (a bad config, a missing spool, an unknown queue ID) end in
one clear line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
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
    print(f"{cfg.path}: ok ({len(cfg.listeners)} listener(s), spool {cfg.node.spool})")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailhop", description="Store-and-forward SMTP relay")
    parser.add_argument("--version", action="version", version=f"mailhop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
        p.add_argument("-c", "--config")
        p.add_argument("--spool", help="spool directory (instead of -c)")
        if name == "list":
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("queue_id")
            p.add_argument("--body", action="store_true", help="print the body too")
        p.set_defaults(func=func)

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
