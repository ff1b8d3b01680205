"""Tools for the fault-injection suite: a private Redis, a TCP proxy that can cut the
database, a fleet of real `lmjobs worker` processes to kill and restart, an in-test
reconciler loop, and the checks every fault test ends with (nothing lost, nothing twice,
no password anywhere).

Every process and thread started here is stopped by the fixture that made it, even when
the test fails. Ports come from binding port 0; the system Redis (6379) and PostgreSQL
(5432) are never stopped or restarted: the tests cut a proxy or run their own Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fake_engine import FAKE_ENGINE
from services import LMJOBS, cli_env
from sqlalchemy import func, select

from lmjobs.db.models import Chunk, Job, Request, Result
from lmjobs.db.session import Database

# Secrets put into the broker and database URLs of every fault test; none may ever show
# in a log line or in CLI output. The PostgreSQL server trusts local connections, so the
# password is accepted and ignored; the private Redis really requires its password.
PG_SECRET = "pgS3cretPW-do-not-log"
REDIS_SECRET = "rdS3cretPW-do-not-log"
SECRETS = (PG_SECRET, REDIS_SECRET)

# One line per figure, printed in the terminal summary and collected for docs/reliability.md.
FIGURES: list[str] = []


def figure(line: str) -> None:
    FIGURES.append(line)
    print(f"\nFIGURE {line}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_prompts(path: Path, n: int, *, poison: dict[int, str] | None = None) -> None:
    """``n`` generate requests with ids p0..p{n-1}; ``poison`` maps index -> marker text."""
    poison = poison or {}
    with open(path, "w") as fh:
        for i in range(n):
            extra = f" {poison[i]}" if i in poison else ""
            fh.write(json.dumps({"id": f"p{i}", "prompt": f"alpha beta gamma {i}{extra}"}) + "\n")


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            at = text.find(secret)
            assert at < 0, f"a password leaked: ...{text[max(0, at - 200) :][:400]}"


def pg_url_with_password(name: str, port: int = 5432) -> str:
    """The server trusts local connections: the password is sent and ignored, which is
    exactly what the leak checks need (a real password-bearing URL everywhere)."""
    return f"postgresql://postgres:{PG_SECRET}@127.0.0.1:{port}/{name}"


def worker_env(home: Path, db_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    env = {
        "LMJOBS_HOME": str(home),
        "LMJOBS_DATABASE_URL": db_url,
        "LMJOBS_BROKER_URL": broker_url,
        "LMJOBS_MODEL": "fake-model",
        "LMJOBS_TEST_ENGINE": FAKE_ENGINE,
        "LMJOBS_LEASE_SECONDS": "5",
        "LMJOBS_HEARTBEAT_SECONDS": "1",
    }
    env.update(extra)
    return cli_env(**env)


# --------------------------------------------------------------------------- Redis


class RedisServer:
    """A private redis-server on a free port, with a password and no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.flushes = 0

    @property
    def url(self) -> str:
        return f"redis://:{REDIS_SECRET}@127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                REDIS_SECRET,
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except Exception:
                time.sleep(0.05)
        raise AssertionError("the private redis-server did not start")

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=REDIS_SECRET, socket_timeout=5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no save, no goodbye to clients
            self.proc.wait(timeout=20)

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()
        self.restarts += 1

    def queued(self, queue: str) -> int:
        """Messages waiting in ``queue`` (all its priority lists)."""
        r = self.client()
        return sum(int(r.llen(k)) for k in r.scan_iter(match=f"{queue}*") if r.type(k) == b"list")

    def flush(self) -> None:
        self.client().flushall()
        self.flushes += 1


# --------------------------------------------------------------------------- TCP proxy


class TcpProxy:
    """127.0.0.1:<port> -> target. ``cut()`` closes every connection and refuses new ones
    (the listening socket is closed); ``restore()`` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tcp-proxy", daemon=True)
        self.cuts = 0

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def start(self) -> TcpProxy:
        self.thread.start()
        self._call(self._listen())
        return self

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers.update((writer, up_w))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self.writers.discard(writer)
        self.writers.discard(up_w)

    async def _cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for w in list(self.writers):
            try:
                w.transport.abort()  # RST, like a dead host or a dropped route
            except Exception:
                pass
        self.writers.clear()

    def cut(self) -> None:
        self._call(self._cut())
        self.cuts += 1

    def restore(self) -> None:
        self._call(self._listen())

    def close(self) -> None:
        try:
            self._call(self._cut())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


# --------------------------------------------------------------------------- workers


@dataclass
class Fleet:
    """``size`` real `lmjobs worker` processes; killed ones can be replaced."""

    env: dict[str, str]
    logdir: Path
    size: int = 2
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    kills: int = 0
    started: int = 0

    def spawn(self) -> subprocess.Popen[bytes]:
        self.started += 1
        log = self.logdir / f"worker-{self.started}.log"
        self.logs.append(log)
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                [*LMJOBS, "worker", "--loglevel", "INFO", "-n", f"w{self.started}@%h"],
                env=self.env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start(self, *, wait: bool = True, timeout: float = 120) -> Fleet:
        for _ in range(self.size):
            self.spawn()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                continue
            while " ready." not in log.read_text(errors="replace"):
                if proc.poll() is not None:
                    tail = log.read_text()[-3000:]
                    raise AssertionError(f"worker exited {proc.returncode}:\n{tail}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker not ready:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def kill_random(self, rng: random.Random) -> bool:
        live = self.alive()
        if not live:
            return False
        victim = rng.choice(live)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        self.kills += 1
        return True

    def top_up(self) -> int:
        """Replace dead workers (a supervisor's job); returns how many were started."""
        n = 0
        while len(self.alive()) < self.size:
            self.spawn()
            n += 1
        return n

    def stop(self) -> None:
        for p in self.alive():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())


# --------------------------------------------------------------------------- reconciler


class Ticker:
    """Runs the reconciler (`jobs.reconcile.tick`, what `lmjobs reconcile` and the beat
    tick run) every ``interval`` seconds on a thread; errors (broker or database down)
    are counted, like a beat tick that fails and comes again."""

    def __init__(self, db_url: str, broker_url: str, interval: float = 1.0) -> None:
        from lmjobs.db.session import get_database
        from lmjobs.jobs.settings import Settings
        from lmjobs.worker.app import make_celery
        from lmjobs.worker.broker import CeleryPublisher

        self.db = get_database(db_url)
        self.broker_url = broker_url
        self.publish = CeleryPublisher(make_celery(Settings(broker_url=broker_url)))
        self.interval = interval
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ticker", daemon=True)
        self.ticks = self.errors = self.expired = self.lost = 0

    def once(self) -> None:
        from lmjobs.jobs.reconcile import tick
        from lmjobs.worker.broker import redis_chunk_ids

        rep = tick(self.db, self.publish, broker_view=lambda: redis_chunk_ids(self.broker_url))
        self.ticks += 1
        self.expired += rep.expired_leases
        self.lost += rep.lost_messages

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.once()
            except Exception:
                self.errors += 1

    def __enter__(self) -> Ticker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=60)


# --------------------------------------------------------------------------- checks


@dataclass
class Tally:
    requests: int
    result_rows: int
    distinct_results: int
    lost: int
    duplicates: int
    by_status: dict[str, int]
    job_status: str
    max_chunk_attempts: int


def tally(db: Database, job_id: int) -> Tally:
    with db.session() as s:
        n_req = s.scalar(select(func.count()).where(Request.job_id == job_id)) or 0
        rows = s.scalar(select(func.count()).where(Result.job_id == job_id)) or 0
        distinct = (
            s.scalar(select(func.count(func.distinct(Result.request_id))).where(Result.job_id == job_id)) or 0
        )
        by_status = dict(
            s.execute(
                select(Result.status, func.count()).where(Result.job_id == job_id).group_by(Result.status)
            ).all()
        )
        status = s.scalar(select(Job.status).where(Job.id == job_id)) or "?"
        attempts = s.scalar(select(func.max(Chunk.attempts)).where(Chunk.job_id == job_id)) or 0
    return Tally(n_req, rows, distinct, n_req - distinct, rows - distinct, by_status, status, attempts)


def results_count(db: Database, job_id: int) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).where(Result.job_id == job_id)) or 0


def generated_counts(calls_file: Path) -> Counter[str]:
    """How many times the fake engine generated each request key."""
    if not calls_file.exists():
        return Counter()
    return Counter(calls_file.read_text().split())


def wait_until(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def job_finished(db: Database, job_id: int) -> bool:
    with db.session() as s:
        st = s.scalar(select(Job.status).where(Job.id == job_id))
    return st in ("completed", "completed_with_failures", "failed", "cancelled")


def texts_of(paths: Iterable[Path]) -> list[str]:
    return [p.read_text(errors="replace") for p in paths if p.exists()]
