"""Keys of the HTTP API: created once (the key itself is shown then and never stored, only
its SHA-256), listed, revoked, and checked on every request."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from lmjobs.db.models import ApiKey, utcnow
from lmjobs.db.session import Database, rows_changed
from lmjobs.jobs.api_errors import InvalidRequestError, KeyExistsError, NoSuchObjectError

KEY_PREFIX = "sk-lmjobs-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")


@dataclass
class KeyInfo:
    id: int
    name: str
    prefix: str  # the key's first characters, to recognise it
    created_at: datetime
    revoked_at: datetime | None


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _info(k: ApiKey) -> KeyInfo:
    return KeyInfo(k.id, k.name, k.key_prefix, k.created_at, k.revoked_at)


def create_key(db: Database, name: str) -> tuple[KeyInfo, str]:
    """A new key named ``name``: its info and the key itself (shown once, stored hashed)."""
    if not _NAME.match(name):
        raise InvalidRequestError(
            f"key name {name!r:.120}: use 1-100 letters, digits, '.', '_', '@' or '-'", param="name"
        )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, key_sha256=_hash(key), key_prefix=key[: len(KEY_PREFIX) + 4])
    try:
        with db.session() as s:
            s.add(row)
            s.flush()
            info = _info(row)
    except IntegrityError:
        raise KeyExistsError(f"a key named {name!r} exists already") from None
    return info, key


def list_keys(db: Database) -> list[KeyInfo]:
    with db.session() as s:
        return [_info(k) for k in s.scalars(select(ApiKey).order_by(ApiKey.id))]


def revoke_key(db: Database, name: str) -> KeyInfo:
    """Revoke the key: every request with it is refused from now on. Revoking twice is an error."""
    with db.session() as s:
        res = s.execute(
            update(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
        )
        k = s.scalar(select(ApiKey).where(ApiKey.name == name))
        if k is None:
            raise NoSuchObjectError(f"no key named {name!r}")
        if rows_changed(res) != 1:
            raise NoSuchObjectError(f"the key {name!r} was revoked already")
        return _info(k)


def authenticate(db: Database, key: str) -> int | None:
    """The id of the live key ``key``, or None (unknown or revoked). Looked up by its hash,
    so the comparison never touches the key itself."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    with db.session() as s:
        return s.scalar(select(ApiKey.id).where(ApiKey.key_sha256 == _hash(key), ApiKey.revoked_at.is_(None)))
