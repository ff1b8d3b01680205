"""Real processes for the benchmark's end-to-end arm and for the tests: the CLI run as a
subprocess, a ``lmjobs worker`` in its own process group, a job waited for, Redis pinged.

The tests import these through ``tests/services.py``; ``tests/`` is not installed, so the
one copy lives here, where ``lmjobs bench`` can reach it from an installed package.
``ServiceProcess`` is the part of ``WorkerProcess`` that any long-running command shares
(``lmjobs serve`` in the API tests, say).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

_P = TypeVar("_P", bound="ServiceProcess")  # typing.Self needs Python 3.11; we support 3.10
LMJOBS = [sys.executable, "-m", "lmjobs.cli"]
# the statuses a job stays in until someone acts (the lifecycle's end states, and paused)
FINISHED = ("completed", "completed_with_failures", "failed", "cancelled", "paused")


class HarnessError(AssertionError):
    """A process the harness drives did not do what it should: a CLI command failed, a
    worker died or never got ready, a job did not finish, Redis did not answer.

    An ``AssertionError``, so a test that meets one fails (not errors) with the process's
    output in the message; the benchmark turns it into its own ``E2EError``.
    """


def check_redis(url: str) -> None:
    """Raise ``HarnessError`` naming the (masked) URL when Redis does not answer a PING
    within 3 s (a worker would wait for it forever)."""
    import redis

    from lmjobs.jobs.settings import mask_url

    try:
        redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3).ping()
    except Exception as exc:
        raise HarnessError(f"cannot reach Redis at {mask_url(url)}: {exc}") from None


def redis_available(url: str) -> bool:
    try:
        check_redis(url)
    except HarnessError:
        return False
    return True


def cli_env(*, keep_lmjobs: bool = True, **overrides: str) -> dict[str, str]:
    """The environment of a CLI or worker process: this one's, plus ``overrides``.

    ``keep_lmjobs=False`` drops every ``LMJOBS_*`` variable first, so only the overrides
    configure lmjobs (the benchmark's worker must not pick up the caller's database or
    broker); the tests keep them (their fixtures set ``LMJOBS_HOME`` in this process).
    """
    env = {k: v for k, v in os.environ.items() if keep_lmjobs or not k.startswith("LMJOBS_")}
    env.update(overrides)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["COLUMNS"] = "200"  # rich tables are not wrapped in captured output
    return env


def run_cli(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    timeout: float = 600,
    check: bool = False,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``lmjobs *args`` in a subprocess; with ``check``, a non-zero exit raises
    ``HarnessError`` with its stdout and stderr."""
    proc = subprocess.run(
        [*LMJOBS, *args], env=dict(env), capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and proc.returncode != 0:
        raise HarnessError(f"lmjobs {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(args: Sequence[str], env: Mapping[str, str], **kw: Any) -> Any:
    """``lmjobs *args --json``, checked, its stdout parsed."""
    proc = run_cli([*args, "--json"], env, check=True, **kw)
    return json.loads(proc.stdout)


class ServiceProcess:
    """A long-running ``lmjobs`` command in its own process group, its output in a log file.

    A subclass says what runs (``command``) and when it is up (``ready``). ``tail_chars``:
    how much of the log an error message quotes (``None``: all of it, as the tests want;
    the benchmark quotes the end, since its report keeps a short reason).
    """

    kind = "process"  # what error messages call it

    def __init__(self, env: Mapping[str, str], log_path: Path, *, tail_chars: int | None = None) -> None:
        self.env, self.log_path = dict(env), log_path
        self.tail_chars = tail_chars
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self: _P, timeout: float = 180) -> _P:
        """Start it and wait until ``ready``; fail at once if it exits first."""
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.kind} exited with {self.proc.returncode}:\n{self.tail()}")
            if self.ready():
                return self
            time.sleep(0.2)
        raise HarnessError(f"{self.kind} not ready after {timeout}s:\n{self.tail()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self) -> str:
        """The log, or its last ``tail_chars`` characters."""
        text = self.log()
        return text if self.tail_chars is None else text[-self.tail_chars :]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> bool:
        """Started and no longer running."""
        return self.proc is not None and self.proc.poll() is not None

    def kill(self) -> None:
        """SIGKILL: the worst case, no chance to clean up."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (a worker's warm shutdown: it finishes the current chunk), then SIGKILL if stuck."""
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


class WorkerProcess(ServiceProcess):
    """A real `lmjobs worker` (Celery, solo pool), up when Celery logs " ready."."""

    kind = "worker"

    def __init__(
        self, env: Mapping[str, str], log_path: Path, name: str = "w1", *, tail_chars: int | None = None
    ) -> None:
        super().__init__(env, log_path, tail_chars=tail_chars)
        self.name = name

    def command(self) -> list[str]:
        return [*LMJOBS, "worker", "--loglevel", "INFO", "-n", f"{self.name}@%h"]

    def ready(self) -> bool:
        return " ready." in self.log()


StatusReader = Callable[[], Mapping[str, Any]]


def wait_for_job(
    env: Mapping[str, str],
    job_id: int,
    *,
    timeout: float = 600,
    statuses: tuple[str, ...] = FINISHED,
    poll_s: float = 1.0,
    read: StatusReader | None = None,
    worker: WorkerProcess | None = None,
) -> dict[str, Any]:
    """Poll the job until its status is one of ``statuses``; return the last status read.

    ``read`` gives the status (a mapping with at least ``"status"``); by default
    ``lmjobs status --json`` as a user runs it. The benchmark reads the database directly
    every 0.25 s instead: it times the job, and a CLI process per poll would blur the time.
    With ``worker``, a worker that dies meanwhile fails the wait at once, with its log.
    """
    status = read or (lambda: cli_json(["status", str(job_id)], env))
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = dict(status())
        if st["status"] in statuses:
            return st
        if worker is not None and worker.exited():
            raise HarnessError(f"the worker died during job {job_id}:\n{worker.tail()}")
        time.sleep(poll_s)
    raise HarnessError(f"job {job_id} did not finish in {timeout}s: {st}")
