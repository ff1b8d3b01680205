"""Uploads: streamed to the files folder, refused past the size and line limits without
filling memory or disk, intact when two arrive at once; the upload's own errors."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from apikit import ServerProcess, api_env, new_key

pytestmark = [pytest.mark.redis, pytest.mark.slow]
BOUNDARY = "lmjobs-test-boundary"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _multipart(total: int, piece: int = 1 << 20) -> Iterator[bytes]:
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    line = b"x" * (64 << 10) + b"\n"  # long lines: the byte limit comes first
    chunk = line * (piece // len(line))
    sent = 0
    while sent < total:
        yield chunk
        sent += len(chunk)
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def _post(
    server: ServerProcess, key: str, body: Iterator[bytes], length: int | None = None
) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    if length is not None:
        headers["Content-Length"] = str(length)
    conn.request("POST", "/v1/files", body=body, headers=headers, encode_chunked=length is None)
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


@pytest.fixture
def server(sqlite_url: str, redis_url: str, tmp_path: Path, lmjobs_home: Path) -> Iterator[ServerProcess]:
    env = api_env(
        lmjobs_home, sqlite_url, redis_url, LMJOBS_MAX_UPLOAD_BYTES="1000000", LMJOBS_MAX_UPLOAD_LINES="100"
    )
    s = ServerProcess(env, tmp_path / "server.log").start()
    s.key = new_key(env, "k")  # type: ignore[attr-defined]
    yield s
    s.stop()


def test_an_oversize_upload_is_refused_without_filling_memory_or_disk(
    server: ServerProcess, lmjobs_home: Path
) -> None:
    key = server.key  # type: ignore[attr-defined]
    before = _rss_kb(server.pid)
    status, body = _post(server, key, _multipart(60 << 20))  # 60 MB, chunked: no length told
    assert status == 413 and body["error"]["code"] == "file_too_large"
    assert _rss_kb(server.pid) - before < 30_000  # far less than the 60 MB sent
    pieces = list(_multipart(20 << 20))  # 20 MB, its length told: refused on it, nothing parsed
    status, body = _post(server, key, iter(pieces), length=sum(map(len, pieces)))
    assert status == 413 and "1000000 bytes" in body["error"]["message"]
    assert list((lmjobs_home / "files").iterdir()) == []


def test_too_many_lines_and_the_upload_errors(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.url, api_key=server.key, max_retries=0)  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError, match="more than the limit of 100 lines"):
        client.files.create(file=("a.jsonl", b"{}\n" * 101), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument"):
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch", extra_body={"expires_after": "x"})
    status, body = _post(server, server.key, iter([b"--" + BOUNDARY.encode() + b"--\r\n"]))  # type: ignore[attr-defined]
    assert status == 400 and body["error"]["param"] == "purpose"
    assert client.files.create(file=("ok.jsonl", b"{}\n" * 100), purpose="batch").bytes == 300
    key = server.key  # type: ignore[attr-defined]
    part = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n{{}}\n\r\n'
    two_files = (part + part + f"--{BOUNDARY}--\r\n").encode()
    status, body = _post(server, key, iter([two_files]))
    assert status == 400 and "one file" in body["error"]["message"]
    long_purpose = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{"b" * 2000}\r\n'
    status, body = _post(server, key, iter([(long_purpose + f"--{BOUNDARY}--\r\n").encode()]))
    assert status == 400 and body["error"]["param"] == "purpose"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/files", body=b"{}", headers={"Authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    assert resp.status == 400 and "multipart/form-data" in json.loads(resp.read())["error"]["message"]
    conn.close()


def test_two_concurrent_uploads_are_both_intact(server: ServerProcess, lmjobs_home: Path) -> None:
    client = openai.OpenAI(base_url=server.url, api_key=server.key, max_retries=0)  # type: ignore[attr-defined]
    datas = [b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, (b"ab" * 2000)) for i in range(90)) for _ in range(2)]
    datas[1] = datas[1].replace(b"ab", b"cd")
    ids: list[str] = ["", ""]

    def up(k: int) -> None:
        ids[k] = client.files.create(file=(f"f{k}.jsonl", datas[k]), purpose="batch").id

    threads = [threading.Thread(target=up, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        assert client.files.content(ids[k]).content == datas[k]
        assert client.files.retrieve(ids[k]).bytes == len(datas[k])
    listed = client.files.list()
    assert {f.id for f in listed} == set(ids)
    client.files.delete(ids[0])
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(ids[0])
    assert sorted(p.name for p in (lmjobs_home / "files").iterdir()) == [ids[1]]
