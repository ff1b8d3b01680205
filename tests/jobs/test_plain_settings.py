"""The settings read without pydantic (jobs/plain_settings.py) equal ``Settings``' reading,
and leave to ``Settings`` every value whose reading or error is pydantic's to give."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from annotated_types import Ge, Gt, Le
from pydantic import ValidationError

from lmjobs.jobs.plain_settings import DEFAULTS, FIELDS, read_plain_settings
from lmjobs.jobs.settings import Settings

_KINDS = {
    Path: "path",
    Path | None: "path?",
    str: "str",
    bool: "bool",
    int: "int",
    int | None: "int?",
    float: "float",
}


def _settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> dict[str, Any]:
    for var in list(os.environ):
        if var.lower().startswith("lmjobs_") and var != "LMJOBS_TEST_MODE":
            monkeypatch.delenv(var)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings().model_dump()


def _plain(env: dict[str, str]) -> dict[str, Any] | None:
    return read_plain_settings({"PATH": "/usr/bin", "LMJOBS_TEST_MODE": "1", **env})


def test_the_field_table_is_the_settings_class() -> None:
    fields = Settings.model_fields
    assert set(FIELDS) == set(fields)
    for name, (kind, ge, le, gt) in FIELDS.items():
        info = fields[name]
        assert _KINDS[info.annotation] == kind, name  # type: ignore[index]
        bounds = {type(m): m for m in info.metadata}
        assert (bounds[Ge].ge if Ge in bounds else None) == ge, name
        assert (bounds[Le].le if Le in bounds else None) == le, name
        assert (bounds[Gt].gt if Gt in bounds else None) == gt, name
        if name != "home":  # a default factory
            assert info.default == DEFAULTS[name], name


PLAIN = [
    {},
    {"LMJOBS_HOME": "/tmp/x"},
    {"LMJOBS_HOME": "~/elsewhere", "LMJOBS_MODEL_CACHE": "/a//b/"},
    {"lmjobs_home": "rel/dir", "LmJobs_Database_Url": "postgresql://u:pw@h/db"},
    {"LMJOBS_CHUNK_SIZE": "100000", "LMJOBS_INGEST_PROCESSES": "0", "LMJOBS_LEASE_SECONDS": "007"},
    {"LMJOBS_QUERY_TIMEOUT_S": "1.5", "LMJOBS_TRUST_REMOTE_CODE": "TRUE", "LMJOBS_DEVICE": "cuda:1"},
    {"LMJOBS_TRUST_REMOTE_CODE": "off", "LMJOBS_DTYPE": "bfloat16", "LMJOBS_FILES_DIR": "/srv/files"},
    {"LMJOBS_MODEL_ALIASES": "gpt-4o-mini=Qwen/Qwen2.5-0.5B-Instruct, a = b", "LMJOBS_WORKER_NAME": ""},
    {"LMJOBS_TEST_ENGINE": "fake_engine:make", "LMJOBS_SOMETHING_ELSE": "ignored"},
    {"LMJOBS_MAX_UPLOAD_BYTES": "1", "LMJOBS_QUERY_TIMEOUT_S": "30", "LMJOBS_HEARTBEAT_SECONDS": "0"},
    {"LMJOBS_PACK_WEIGHTS": "false"},
    {"LMJOBS_DRAFT_TOKENS": "0"},
    {"LMJOBS_DRAFT_TOKENS": "16"},
    {"LMJOBS_KEEP_FREED_MEMORY": "false"},
]


@pytest.mark.parametrize("env", PLAIN)
def test_plain_values_read_as_settings_reads_them(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    plain = _plain(env)
    assert plain is not None
    assert plain == _settings(monkeypatch, env)


# Values pydantic reads (or refuses with its own words) that the plain reader leaves to it.
DOUBTFUL = [
    {"LMJOBS_CHUNK_SIZE": " 5"},  # accepted by pydantic: 5
    {"LMJOBS_CHUNK_SIZE": "1_000"},
    {"LMJOBS_CHUNK_SIZE": "+5"},
    {"LMJOBS_CHUNK_SIZE": "5.0"},
    {"LMJOBS_CHUNK_SIZE": "0"},  # out of range: refused
    {"LMJOBS_CHUNK_SIZE": "100001"},
    {"LMJOBS_CHUNK_SIZE": "zero"},
    {"LMJOBS_DRAFT_TOKENS": "-1"},  # out of range: refused
    {"LMJOBS_DRAFT_TOKENS": "17"},
    {"LMJOBS_KEEP_FREED_MEMORY": "sometimes"},
    {"LMJOBS_INGEST_PROCESSES": ""},
    {"LMJOBS_LEASE_SECONDS": "4"},
    {"LMJOBS_QUERY_TIMEOUT_S": "0"},
    {"LMJOBS_QUERY_TIMEOUT_S": "1e3"},
    {"LMJOBS_QUERY_TIMEOUT_S": ".5"},
    {"LMJOBS_TRUST_REMOTE_CODE": " true"},
    {"LMJOBS_TRUST_REMOTE_CODE": "maybe"},
    {"LMJOBS_HOME": ""},  # pydantic reads Path(".")
    {"LMJOBS_MODEL_CACHE": ""},
    {"LMJOBS_DTYPE": "float8"},
    {"LMJOBS_DEVICE": "tpu"},
    {"LMJOBS_MODEL_ALIASES": "no-equals-sign"},
    {"LMJOBS_MODEL": "bad\udcff"},  # undecodable bytes in the environment
    {"LMJOBS_MODEL": "a", "lmjobs_model": "b"},  # which one wins is pydantic-settings' choice
]


@pytest.mark.parametrize("env", DOUBTFUL)
def test_doubtful_values_are_left_to_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    assert _plain(env) is None
    try:  # whatever Settings makes of them, it is the one that says it
        _settings(monkeypatch, {k: v for k, v in env.items() if "\udcff" not in v})
    except ValidationError:
        pass


def test_the_test_engine_outside_test_mode_is_left_to_settings() -> None:
    assert read_plain_settings({"LMJOBS_TEST_ENGINE": "fake_engine:make"}) is None
    assert read_plain_settings({"LMJOBS_TEST_ENGINE": "x", "LMJOBS_TEST_MODE": "yes"}) is None
