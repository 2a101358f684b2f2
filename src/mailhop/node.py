"""One node: config in, listeners and spool wired together, graceful stop.

The same program is the ingress (Shanghai) and the egress (Tokyo) node of
the seed's chain; only the config differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
from dataclasses import replace
from typing import Any

from . import __version__, control
from .config import Config, ConfigError, load
from .delivery.credentials import CredentialsError
from .delivery.scheduler import Scheduler
from .observe import metrics as metrics_http
from .observe.maillog import MailLog
from .observe.metrics import Metrics
from .smtpd.auth import UserFileError
from .smtpd.listener import Listener
from .spool import ops
from .spool.store import Spool, StoreError

DRAIN_SECONDS = 30.0


def raise_fd_limit() -> None:
    """A relay holds many connections; the usual soft limit of 1024 is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Node:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.maillog = MailLog(cfg.log, cfg.node.hostname)
        self.spool = Spool(cfg.node.spool)
        self.spool.min_free = cfg.node.min_free
        self.listeners: list[Listener] = []
        self.scheduler: Scheduler | None = None
        self.control: asyncio.AbstractServer | None = None
        self.metrics: Metrics | None = None
        self.metrics_server: asyncio.AbstractServer | None = None
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        notes = await asyncio.to_thread(self.spool.open)
        for note in notes:
            self.maillog.emit("master", f"spool recovery: {note}")
        if self.cfg.metrics is not None:
            self.metrics = Metrics(self.spool.db_path)
            self.spool.on_commit = self.metrics.commit.observe
            host, port = self.cfg.metrics
            self.metrics_server = await metrics_http.serve(host, port, self.metrics, self.health)
        self.scheduler = Scheduler(self.cfg, self.spool, self.maillog, metrics=self.metrics)
        self.scheduler.start()
        self.control = await control.serve(self.cfg.node.spool, self._control)
        for lcfg in self.cfg.listeners:
            listener = Listener(lcfg, self.cfg.node.hostname, self.spool, self.maillog,
                                on_queued=self.scheduler.submit_new, metrics=self.metrics)
            await listener.start()
            self.listeners.append(listener)
        where = ", ".join(lst.cfg.name for lst in self.listeners)
        self.maillog.emit("master", f"daemon started -- version {__version__}, node "
                          f"{self.cfg.node.name}, listening on {where}")

    async def stop(self) -> None:
        """Stop accepting, let messages in DATA finish, then close the spool."""
        for listener in self.listeners:
            listener.stop_accepting()
        await asyncio.gather(*(lst.drain(DRAIN_SECONDS) for lst in self.listeners))
        if self.control is not None:
            self.control.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.scheduler is not None:
            await self.scheduler.stop()
        await asyncio.to_thread(self.spool.close)
        self.maillog.emit("master", "terminating on signal")
        self.maillog.close()

    async def health(self) -> list[str]:
        """What /healthz reports: empty when the node can take and pass on mail."""
        problems = []
        try:
            await asyncio.wait_for(self.spool.write(lambda db: None), 5)
        except (TimeoutError, StoreError) as exc:
            problems.append(f"spool not writable: {exc or 'commit timed out'}")
        try:
            if self.spool.free_bytes() < self.spool.min_free:
                problems.append("spool disk below min_free: new mail is refused (452)")
        except OSError as exc:
            problems.append(f"spool: {exc}")
        if not any(lst.accepting for lst in self.listeners):
            problems.append("not accepting connections (shutting down)")
        if self.scheduler is not None:
            problems += self.scheduler.health()
        return problems

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Queue control from ``mailhop queue ...`` (see :mod:`mailhop.control`)."""
        action = request["action"]
        ids = [str(i) for i in request.get("ids", [ops.ALL])]
        scheduler = self.scheduler
        assert scheduler is not None
        if action == "status":
            return {"ok": True, "node": self.cfg.node.name, "hops": scheduler.status(),
                    "queue": await self.spool.stats(), "health": await self.health()}
        if action == "delete":
            body_dir = self.spool.body_dir
            done = await self.spool.write(lambda db: ops.delete(db, ids, body_dir))
        elif action in ops.ACTIONS:
            fn = ops.ACTIONS[action]
            done = await self.spool.write(lambda db: fn(db, ids))
        else:
            return {"ok": False, "error": f"unknown action {action!r}"}
        if action in ("hold", "delete"):
            scheduler.cancel(done)
        else:
            scheduler.wake()
        for queue_id in done:
            self.maillog.emit("postsuper", {"hold": "placed on hold", "release":
                                            "released from hold", "delete": "removed",
                                            "requeue": "requeued", "flush": "flushed"}[action],
                              queue_id)
        return {"ok": True, "ids": done}

    async def reload(self) -> None:
        """SIGHUP: read the config again; on any error keep running the old one.

        Queued mail and established sessions are untouched: a session keeps the
        settings it started with, new sessions and new deliveries get the new ones.
        """
        try:
            cfg = load(self.cfg.path)
            for lcfg in cfg.listeners:  # certificates, users: fail now, not per session
                Listener.check(lcfg)
            scheduler_check = Scheduler.load_credentials(cfg)
        except (ConfigError, CredentialsError, UserFileError, OSError, ValueError) as exc:
            self.maillog.warning("master", f"reload failed, keeping the running "
                                 f"configuration: {exc}")
            return
        if cfg.node.spool != self.cfg.node.spool or cfg.log != self.cfg.log:
            self.maillog.warning("master", "reload: spool and log settings need a restart; "
                                 "keeping the old ones")
        old = {(lst.cfg.host, lst.cfg.port): lst for lst in self.listeners}
        kept: list[Listener] = []
        for lcfg in cfg.listeners:
            listener = old.pop((lcfg.host, lcfg.port), None)
            if listener is not None:
                listener.configure(lcfg)
            else:
                assert self.scheduler is not None
                listener = Listener(lcfg, cfg.node.hostname, self.spool, self.maillog,
                                    on_queued=self.scheduler.submit_new, metrics=self.metrics)
                await listener.start()
            kept.append(listener)
        for listener in old.values():  # removed: stop accepting, let sessions finish
            listener.stop_accepting()
        self.listeners = kept
        if self.scheduler is not None:
            self.scheduler.reconfigure(cfg, scheduler_check)
        self.cfg = replace(cfg, node=replace(cfg.node, spool=self.cfg.node.spool),
                           log=self.cfg.log)
        self.maillog.emit("master", "reload -- configuration " + str(cfg.path))

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopped.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        try:
            await self.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.spool.close)
            raise
        await self.stopped.wait()
        await self.stop()


def run(cfg: Config) -> None:
    raise_fd_limit()
    try:
        import uvloop
    except ImportError:  # not on Linux: plain asyncio works, just slower
        asyncio.run(Node(cfg).serve())
    else:
        uvloop.run(Node(cfg).serve())
