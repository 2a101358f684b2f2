"""Postfix-compatible maillog lines (and the same facts as JSON lines).

Lines look exactly like Postfix's so that operators keep their tools:
``grep QUEUEID``, ``pflogsumm --syslog-name=mailhop`` and log shippers all
work unchanged.  The optional JSON log carries the same fields for machines.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
import sys
import time
from typing import Any

from ..config import LogConfig


class _PostfixFormatter(logging.Formatter):
    """``Oct 18 17:35:15 host NAME/program[pid]: text`` like syslog writes it."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime(record.created))
        return f"{stamp} {self.host} {record.getMessage()}"


class MailLog:
    def __init__(self, cfg: LogConfig, hostname: str | None = None) -> None:
        self.name = cfg.syslog_name
        self.pid = os.getpid()
        host = (hostname or socket.gethostname()).split(".")[0]
        self._log = logging.Logger(f"mailhop.maillog.{id(self)}")
        self._log.propagate = False
        handler: logging.Handler
        if cfg.maillog == "syslog":
            handler = logging.handlers.SysLogHandler(
                address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL)
        elif cfg.maillog == "stderr":
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_PostfixFormatter(host))
        else:
            os.makedirs(os.path.dirname(cfg.maillog) or ".", exist_ok=True)
            handler = logging.handlers.WatchedFileHandler(cfg.maillog, encoding="utf-8")
            handler.setFormatter(_PostfixFormatter(host))
        self._log.addHandler(handler)
        self._json: logging.Logger | None = None
        if cfg.json is not None:
            self._json = logging.Logger(f"mailhop.json.{id(self)}")
            self._json.propagate = False
            jh = logging.handlers.WatchedFileHandler(cfg.json, encoding="utf-8")
            self._json.addHandler(jh)

    def emit(self, program: str, text: str, queue_id: str | None = None,
             **fields: Any) -> None:
        prefix = f"{queue_id}: " if queue_id else ""
        self._log.info("%s/%s[%d]: %s%s", self.name, program, self.pid, prefix, text)
        if self._json is not None:
            record = {"ts": round(time.time(), 6), "program": program, "queue_id": queue_id,
                      **fields, "text": text}
            self._json.info(json.dumps(record, ensure_ascii=False))

    def warning(self, program: str, text: str) -> None:
        self.emit(program, f"warning: {text}", level="warning")

    def close(self) -> None:
        for logger in (self._log, self._json):
            if logger is not None:
                for handler in list(logger.handlers):
                    handler.close()
                    logger.removeHandler(handler)
