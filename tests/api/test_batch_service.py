"""The batch, file and key services in process (no server, no broker: nothing is published),
for the paths the HTTP tests cannot reach: a job gone, a finalize taken over, an empty file,
the upload writer's limits, model names, windows, a bad alias setting."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from services import cli_env, run_cli
from sqlalchemy import delete, update

from lmjobs.db.models import Batch, BatchStatus, Job, JobStatus, utcnow
from lmjobs.db.session import get_database
from lmjobs.jobs import batches, files
from lmjobs.jobs.api_errors import InvalidRequestError, NoSuchObjectError, UploadTooLargeError
from lmjobs.jobs.batch_input import parse_window, resolve_model
from lmjobs.jobs.keys import authenticate, create_key
from lmjobs.jobs.settings import Settings

LINE = json.dumps(
    {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
)


def _settings(db_url: str, home: Path) -> Settings:
    return Settings(home=home, database_url=db_url, model="fake-model", model_aliases="m=fake-model")


def _upload(s: Settings, db_url: str, key_id: int, data: bytes) -> str:
    w = files.UploadWriter(s, max_bytes=s.max_upload_bytes, max_lines=s.max_upload_lines)
    w.write(data)
    return w.commit(get_database(db_url), key_id=key_id, filename="in.jsonl", purpose="batch").id


def _batch(s: Settings, db_url: str, data: bytes) -> tuple[int, batches.BatchView]:
    db = get_database(db_url)
    key_id = create_key(db, "k")[0].id
    fid = _upload(s, db_url, key_id, data)
    view = batches.create_batch(
        db,
        s,
        None,
        key_id=key_id,
        input_file_id=fid,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    return key_id, view


def test_an_empty_file_makes_a_failed_batch(db_url: str, lmjobs_home: Path) -> None:
    s = _settings(db_url, lmjobs_home)
    _, v = _batch(s, db_url, b"")
    assert v.batch.status == "failed" and v.batch.errors_json == [
        {"code": "empty_file", "message": "the input file has no lines", "param": None, "line": None}
    ]


def test_a_batch_whose_job_was_deleted_fails(db_url: str, lmjobs_home: Path) -> None:
    s = _settings(db_url, lmjobs_home)
    key_id, v = _batch(s, db_url, (LINE + "\n").encode())
    assert v.batch.status == "in_progress" and v.total == 1
    db = get_database(db_url)
    with db.session() as sess:
        sess.execute(delete(Job).where(Job.id == v.batch.job_id))
    got = batches.get_batch(db, s, key_id, v.batch.id)
    assert got.batch.status == "failed" and got.batch.errors_json[0]["code"] == "job_deleted"


def test_a_finalize_left_by_a_dead_process_is_taken_over(db_url: str, lmjobs_home: Path) -> None:
    s = _settings(db_url, lmjobs_home)
    key_id, v = _batch(s, db_url, (LINE + "\n").encode())
    db = get_database(db_url)
    with db.session() as sess:
        sess.execute(update(Job).where(Job.id == v.batch.job_id).values(status=JobStatus.COMPLETED.value))
        recent = utcnow() - timedelta(minutes=1)
        sess.execute(
            update(Batch)
            .where(Batch.id == v.batch.id)
            .values(status=BatchStatus.FINALIZING.value, finalizing_at=recent)
        )
    assert batches.get_batch(db, s, key_id, v.batch.id).batch.status == "finalizing"  # still its own
    with db.session() as sess:
        sess.execute(
            update(Batch).where(Batch.id == v.batch.id).values(finalizing_at=recent - timedelta(hours=1))
        )
    done = batches.get_batch(db, s, key_id, v.batch.id).batch
    assert done.status == "completed" and done.output_file_id is None and done.error_file_id
    err = files.file_path(db, s, key_id, done.error_file_id).read_text()
    assert json.loads(err)["error"]["code"] == "batch_incomplete"  # the one line never ran


def test_the_upload_writer_keeps_nothing_past_a_limit(db_url: str, lmjobs_home: Path) -> None:
    s = _settings(db_url, lmjobs_home)
    folder = files.files_folder(s)
    w = files.UploadWriter(s, max_bytes=10, max_lines=5)
    with pytest.raises(UploadTooLargeError):
        w.write(b"x" * 11)
    w = files.UploadWriter(s, max_bytes=100, max_lines=2)
    w.write(b"a\nb\nc")  # the third line has no newline: counted at the end
    with pytest.raises(InvalidRequestError, match="2 lines"):
        w.commit(get_database(db_url), key_id=1, filename="f", purpose="batch")
    assert list(folder.iterdir()) == []


def test_files_and_keys_refusals(db_url: str, lmjobs_home: Path) -> None:
    s = _settings(db_url, lmjobs_home)
    db = get_database(db_url)
    key_id = create_key(db, "k")[0].id
    fid = _upload(s, db_url, key_id, b"{}\n")
    (s.files_path / fid).unlink()
    with pytest.raises(NoSuchObjectError, match="gone"):
        files.file_path(db, s, key_id, fid)
    with pytest.raises(NoSuchObjectError):
        files.get_file(db, key_id + 1, fid)
    for purpose in (None, "", "assistants"):
        with pytest.raises(InvalidRequestError):
            files.check_purpose(purpose)
    with pytest.raises(InvalidRequestError):
        files.list_files(db, key_id, purpose=None, after=None, limit=0, order="desc")
    w = files.UploadWriter(s, max_bytes=10, max_lines=5)
    w.write(b"{}\n")
    assert w.commit(db, key_id=key_id, filename="a\x00b\n.jsonl", purpose="batch").filename == "ab.jsonl"
    assert authenticate(db, "nope") is None and authenticate(db, "sk-lmjobs-" + "x" * 300) is None


def test_model_names_and_windows(lmjobs_home: Path) -> None:
    s = Settings(home=lmjobs_home, model="smollm2-135m", model_aliases="gpt-4o-mini=/models/qwen")
    assert resolve_model(s, "gpt-4o-mini") == "/models/qwen"
    assert resolve_model(s, "smollm2-135m") == "smollm2-135m"
    assert resolve_model(s, "Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    for name in ("/etc/passwd", "../x/y", "a/../b", "gpt-4o", "a/b/c", "./a"):
        assert resolve_model(s, name) is None, name
    assert parse_window("24h") == timedelta(hours=24)
    assert parse_window("90s") == timedelta(seconds=90)
    for bad in ("", "24", "1d", "0m", "169h", "-1h", "1.5h"):
        with pytest.raises(InvalidRequestError):
            parse_window(bad)


def test_serve_refuses_a_malformed_alias_setting(lmjobs_home: Path) -> None:
    env = cli_env(LMJOBS_HOME=str(lmjobs_home), LMJOBS_MODEL_ALIASES="gpt-4o-mini")
    proc = run_cli(["serve", "--port", "1"], env, timeout=60)
    assert proc.returncode == 1
    assert "LMJOBS_MODEL_ALIASES" in proc.stderr and "is not alias=model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_batch_whose_validation_breaks_does_not_stay_validating(
    db_url: str, lmjobs_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _settings(db_url, lmjobs_home)

    def broken(*args: object, **kw: object) -> None:
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(batches, "submit_file", broken)
    with pytest.raises(RuntimeError):
        _batch(s, db_url, (LINE + "\n").encode())
    db = get_database(db_url)
    with db.session() as sess:
        (b,) = sess.query(Batch).all()
    assert b.status == "failed" and b.errors_json[0]["code"] == "server_error"
    key_id = b.api_key_id
    fid = _upload(s, db_url, key_id, b"{}\n")
    (s.files_path / fid).unlink()
    with pytest.raises(NoSuchObjectError, match="gone"):
        batches.create_batch(
            db,
            s,
            None,
            key_id=key_id,
            input_file_id=fid,
            endpoint="/v1/chat/completions",
            completion_window="1h",
        )


def test_a_database_fault_is_a_500_in_openais_shape(tmp_path: Path, lmjobs_home: Path) -> None:
    import threading
    import time

    import openai
    import uvicorn
    from apikit import free_port

    from lmjobs.api.app import create_app

    url = f"sqlite:///{tmp_path / 'never-migrated.db'}"  # no tables: every query fails
    s = Settings(home=lmjobs_home, database_url=url)
    port = free_port()
    app = create_app(s, get_database(url), None, refresh=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-lmjobs-x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            client.files.list()
        assert err.value.status_code == 500
        assert err.value.body == {
            "message": "internal server error",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    finally:
        server.should_exit = True
        thread.join(timeout=10)
