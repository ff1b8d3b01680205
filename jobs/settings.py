"""One typed settings object, read from ``LMJOBS_*`` environment variables.

``LMJOBS_HOME`` moves all local state (the SQLite file, the model cache), which is what
keeps tests hermetic.

The commands that only follow jobs read the same variables without this class when they
are plainly written (jobs/plain_settings.py, which also holds the checks both share); any
other value comes here, so its reading and its error are pydantic's.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lmjobs.db.urls import mask_secrets, mask_url
from lmjobs.jobs.plain_settings import default_home, finish, parse_aliases

__all__ = ["Settings", "get_settings", "mask_secrets", "mask_url", "reset_settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LMJOBS_", extra="ignore")

    home: Path = Field(default_factory=default_home)
    database_url: str = ""  # default: sqlite:///<home>/lmjobs.db
    # `lmjobs query` connects here when set (a SELECT-only role; docs/security.md)
    query_database_url: str = ""
    broker_url: str = "redis://127.0.0.1:6379/0"
    model: str = "smollm2-135m"
    model_cache: Path | None = None  # default: <home>/models
    device: str = "auto"  # auto | cpu | cuda | cuda:N | split (one model over all visible GPUs)
    # auto (CPU: bf16 where the CPU computes it natively, else fp32; CUDA: bf16/fp16) | float32 |
    # float16 | bfloat16
    dtype: str = "auto"
    trust_remote_code: bool = False
    chunk_size: int = Field(default=64, ge=1, le=100_000)
    # Processes that parse a submitted file: unset = one per core for files of 8 MB and more
    # (none below, or on one core); 0 = parse in the submitting process.
    ingest_processes: int | None = Field(default=None, ge=0, le=256)
    lease_seconds: int = Field(default=300, ge=5)
    heartbeat_seconds: int = Field(default=0, ge=0)  # 0: lease_seconds / 3
    max_attempts: int = Field(default=3, ge=1)
    batch_tokens: int = Field(default=0, ge=0)  # 0: the engine picks from free memory
    max_batch_size: int = Field(default=64, ge=1)
    # Linear weights prepacked for oneDNN where it pays on the CPU (worker/engine/packing.py)
    pack_weights: bool = True
    # Prompt-lookup speculative decoding: greedy rows check up to this many tokens drafted
    # from their own text in each decode step (worker/engine/speculation.py); 0 = off
    draft_tokens: int = Field(default=4, ge=0, le=16)
    # A worker (and `lmjobs run`) keeps the memory its engine calls free for the next one
    # instead of giving it back to the OS and faulting it in again (glibc; worker/runtime.py)
    keep_freed_memory: bool = True
    chunk_time_limit_s: int = Field(default=3600, ge=10)
    query_timeout_s: float = Field(default=30.0, gt=0)
    worker_name: str = ""
    # "module:factory" of a fake engine, for lmjobs' own test suite only (LMJOBS_TEST_MODE=1);
    # the factory returns a GenerateFn with an ``info`` (ModelInfo) attribute.
    test_engine: str = ""

    @field_validator("chunk_size", "max_attempts", "ingest_processes", mode="before")
    @classmethod
    def _strip(cls, v: object) -> object:
        return v.strip() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        # The defaults under home and the checks a field's type cannot make: shared with
        # the commands that read the settings without pydantic (jobs/plain_settings.py).
        names = ("home", "database_url", "model_cache", "dtype", "device", "test_engine")
        values = {k: getattr(self, k) for k in names}
        finish(values)
        self.home, self.database_url = values["home"], values["database_url"]
        self.model_cache = values["model_cache"]
        return self

    @property
    def heartbeat_interval(self) -> float:
        return float(self.heartbeat_seconds or max(1.0, self.lease_seconds / 3))

    def masked(self) -> dict[str, str]:
        """Settings as printable strings, with passwords in URLs masked."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = str(getattr(self, name))
            out[name] = mask_url(value) if name.endswith("_url") else value
        return out

    # -- the HTTP API (`lmjobs serve`) ------------------------------------------------------
    files_dir: Path | None = None  # uploads and batch outputs; default: <home>/files
    max_upload_bytes: int = Field(default=200_000_000, ge=1)  # as OpenAI's batch input limit
    max_upload_lines: int = Field(default=50_000, ge=1)  # requests per batch file, as OpenAI's
    # "alias=model,alias=model": the names an OpenAI line's body.model may use for a model
    # (gpt-4o-mini=Qwen/Qwen2.5-0.5B-Instruct); other names must be a Hugging Face id.
    model_aliases: str = ""

    @field_validator("model_aliases")
    @classmethod
    def _check_aliases(cls, v: str) -> str:
        parse_aliases(v)  # checked at start-up
        return v

    @property
    def files_path(self) -> Path:
        return Path(self.files_dir).expanduser() if self.files_dir else self.home / "files"

    @property
    def model_alias_map(self) -> dict[str, str]:
        return parse_aliases(self.model_aliases)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    get_settings.cache_clear()
