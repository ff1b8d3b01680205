"""A real ``lmjobs serve`` process on a free port, and what the API tests share."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fake_engine import FAKE_ENGINE
from services import LMJOBS, cli_env, cli_json

ALIAS = "gpt-4o-mini"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api_env(home: Path, db_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    return cli_env(
        LMJOBS_HOME=str(home),
        LMJOBS_DATABASE_URL=db_url,
        LMJOBS_BROKER_URL=redis_url,
        LMJOBS_MODEL="fake-model",
        LMJOBS_MODEL_ALIASES=f"{ALIAS}=fake-model",
        LMJOBS_CHUNK_SIZE="2",
        LMJOBS_TEST_ENGINE=FAKE_ENGINE,
        **extra,
    )


def new_key(env: dict[str, str], name: str) -> str:
    return str(cli_json(["keys", "create", name], env)["key"])


class ServerProcess:
    """``lmjobs serve`` in its own process group; ``url`` is the openai client's base_url."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> ServerProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*LMJOBS, "serve", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(f"{self.url}/files", timeout=2)
            except urllib.error.HTTPError:
                return self  # it answers (401 without a key)
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def chat_line(i: int, text: str, *, model: str = ALIAS) -> str:
    return json.dumps(
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16},
        }
    )


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def wait_status(client: Any, batch_id: str, statuses: tuple[str, ...], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    b = client.batches.retrieve(batch_id)
    while b.status not in statuses:
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {b.status} after {timeout}s: {b}")
        time.sleep(0.5)
        b = client.batches.retrieve(batch_id)
    return b
