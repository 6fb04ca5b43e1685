"""Usage events: buffered per worker, sent with the next rate-limit round trip, spooled to disk when Redis fails."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import redis
from django.conf import settings

from apimgmt.redis_client import get_redis
from gateway import metrics

logger = logging.getLogger(__name__)

STREAM_KEY = "usage:events"
FLUSH_AFTER_SECONDS = 0.2
MAX_BUFFER = 10_000  # beyond this, events go straight to the spool (Redis is slow or gone)
REPLAY_BATCH = 500


class UsageRecorder:
    """Collects usage events of one worker. The gateway never trims the stream (the flusher does)."""

    def __init__(self, spool_dir: str | None = None) -> None:
        self.lock = threading.Lock()
        self.buffer: list[dict[str, str]] = []
        self.oldest = 0.0
        self.spool_dir = Path(spool_dir or settings.GATEWAY["USAGE_SPOOL_DIR"])
        self.pid = os.getpid()
        self.thread: threading.Thread | None = None
        self.stopped = threading.Event()
        self.spool_pending = False
        self._id_prefix = ""
        self._id_pid = 0
        self._ids = itertools.count()

    # -- hot path -------------------------------------------------------------------------------------------------

    def event_id(self) -> str:
        """A new id for a usage event, unique across workers and restarts (the flusher deduplicates by it).

        Never the request id: a client may send its own X-Request-ID, and the same value on many requests would
        otherwise make them count once.
        """
        if self._id_pid != os.getpid():  # a new process (forked worker): a new random prefix
            self._id_prefix, self._id_pid, self._ids = secrets.token_hex(8), os.getpid(), itertools.count()
        return f"{self._id_prefix}-{next(self._ids)}"

    def record(self, event: dict[str, str]) -> None:
        with self.lock:
            if not self.buffer:
                self.oldest = time.monotonic()
            self.buffer.append(event)
            overflow = len(self.buffer) > MAX_BUFFER
        if overflow:
            self.spool(self.take())

    def take(self) -> list[dict[str, str]]:
        """Remove and return the buffered events (the caller sends them or spools them)."""
        with self.lock:
            events, self.buffer = self.buffer, []
        return events

    def add_to_pipeline(self, pipe: Any, events: list[dict[str, str]]) -> None:
        for event in events:
            pipe.xadd(STREAM_KEY, event)

    # -- background -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start this worker's flusher thread (idempotent; restarted in a forked child)."""
        if self.thread is not None and self.thread.is_alive() and self.pid == os.getpid():
            return
        self.pid = os.getpid()
        self.stopped.clear()
        self.thread = threading.Thread(target=self._run, name="usage-flusher", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.flush()

    def _run(self) -> None:
        self.replay_spool(include_dead_workers=True)
        while not self.stopped.wait(FLUSH_AFTER_SECONDS / 2):
            try:
                with self.lock:
                    due = bool(self.buffer) and time.monotonic() - self.oldest >= FLUSH_AFTER_SECONDS
                if due:
                    self.flush()
                elif self.spool_pending:
                    self.replay_spool()
            except Exception:
                logger.exception("usage flusher iteration failed")

    def flush(self) -> None:
        events = self.take()
        if not events:
            return
        client = get_redis()
        if client is None:
            return  # no Redis configured: usage is not collected (development)
        try:
            pipe = client.pipeline(transaction=False)
            self.add_to_pipeline(pipe, events)
            pipe.execute()
        except redis.RedisError:
            self.spool(events)
            return
        if self.spool_pending:
            self.replay_spool()

    # -- spool ----------------------------------------------------------------------------------------------------

    def spool_path(self) -> Path:
        return self.spool_dir / f"usage-{os.getpid()}.jsonl"

    def spool(self, events: list[dict[str, str]]) -> None:
        """Append events to this worker's spool file; they are replayed when Redis answers again."""
        if not events:
            return
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            with self.lock, open(self.spool_path(), "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events))
            self.spool_pending = True
            metrics.usage_spooled_events.inc(len(events))
        except OSError:
            logger.exception("could not spool %d usage events; they are lost", len(events))

    def replay_spool(self, *, include_dead_workers: bool = False) -> int:
        """XADD the events of this worker's spool (and of dead workers' at start-up), then delete the files."""
        client = get_redis()
        if client is None or not self.spool_dir.is_dir():
            self.spool_pending = False
            return 0
        paths = [self.spool_path()]
        if include_dead_workers:
            paths += [p for p in self.spool_dir.glob("usage-*.jsonl") if not _owner_alive(p)]
        sent = 0
        for path in paths:
            claimed = path.with_name(f"{path.name}.replay-{os.getpid()}")
            with self.lock:
                try:
                    os.rename(path, claimed)  # atomic claim: no two workers replay the same file
                except OSError:
                    continue
            try:
                sent += self._send_file(client, claimed)
            except (redis.RedisError, OSError):
                # Put the events back for a later try.
                with self.lock, contextlib.suppress(OSError):
                    with open(claimed, encoding="utf-8") as src, open(self.spool_path(), "a", encoding="utf-8") as dst:
                        dst.write(src.read())
                    claimed.unlink()
                self.spool_pending = True
                return sent
            claimed.unlink(missing_ok=True)
        self.spool_pending = False
        return sent

    @staticmethod
    def _send_file(client: redis.Redis, path: Path) -> int:
        sent = 0
        with open(path, encoding="utf-8") as fh:
            batch: list[dict[str, str]] = []
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    batch.append(json.loads(line))
                except ValueError:
                    continue  # a torn last line from a crash: skip it
                if len(batch) >= REPLAY_BATCH:
                    sent += _xadd_all(client, batch)
                    batch = []
            if batch:
                sent += _xadd_all(client, batch)
        return sent


def _xadd_all(client: redis.Redis, events: list[dict[str, str]]) -> int:
    pipe = client.pipeline(transaction=False)
    for event in events:
        pipe.xadd(STREAM_KEY, event)  # type: ignore[arg-type]
    pipe.execute()
    return len(events)


def _owner_alive(path: Path) -> bool:
    try:
        pid = int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def xadd_commands(events: list[dict[str, str]]) -> list[tuple[str, ...]]:
    """The raw XADD commands of ``events`` (sent ahead of the limiter's EVALSHA, in the same write)."""
    commands = []
    for event in events:
        command = ["XADD", STREAM_KEY, "*"]
        for field, value in event.items():
            command += (field, value)
        commands.append(tuple(command))
    return commands
