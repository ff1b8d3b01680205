"""Recurring jobs: a cron expression, a file and submit options; ``tick`` starts them.

Decisions:

* Cron times are wall-clock times in the schedule's time zone (an IANA name such as
  ``Europe/Berlin``, resolved from the machine's local zone when none is given, and stored
  with the schedule so every beat host agrees). ``0 2 * * *`` is 02:00 there, across DST.
* ``next_run_at`` is stored in UTC. :func:`run_due_schedules` claims a due schedule with
  one conditional UPDATE (``WHERE next_run_at = <the value it read>``) before it creates
  the job, so two ticks running at once (two beat hosts, a manual ``lmjobs reconcile``)
  create one job, never two.
* Missed runs are not replayed: a beat that was down for three nights starts one job and
  moves ``next_run_at`` to the next time after now.
* The file is read when the job is created, not when the schedule is added (a nightly
  export is rewritten between runs). A run whose file is missing or has no valid line is
  logged and skipped; the schedule moves on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import delete, select, update

from lmjobs.db.models import Schedule, utcnow
from lmjobs.db.session import Database, rows_changed
from lmjobs.jobs.dispatch import Publisher
from lmjobs.jobs.errors import LmjobsError
from lmjobs.jobs.inputs import TASKS
from lmjobs.jobs.submit import SubmitOptions, submit_file

log = logging.getLogger(__name__)

# Submit options a schedule may carry (the rest are per run: start_at, schedule_id).
OPTION_KEYS = ("params", "chunk_size", "priority", "strict", "max_line_bytes")
_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


class ScheduleError(LmjobsError):
    """A schedule cannot be added or found (bad cron, missing file, unknown id). User-facing."""


@dataclass
class ScheduleInfo:
    id: int
    name: str | None
    cron: str
    timezone: str
    source_path: str
    task: str
    model: str
    options: dict[str, Any]
    enabled: bool
    next_run_at: datetime
    last_run_at: datetime | None
    last_job_id: int | None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, datetime):
                d[k] = v.isoformat()
        return d


def local_zone_name() -> str:
    """The machine's IANA zone name (``TZ``, then ``/etc/localtime``), or ``UTC``."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    except OSError:
        pass
    for name in candidates:
        if name and _zone(name) is not None:
            return name
    return "UTC"


def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def check_cron(cron: str) -> str:
    from croniter import croniter

    text = " ".join(cron.split())
    if text.lower() not in _MACROS and len(text.split()) != 5:
        raise ScheduleError(
            f"cron {cron!r}: use five fields (minute hour day month weekday), e.g. '0 2 * * *'"
        )
    if not croniter.is_valid(text):
        raise ScheduleError(f"cron {cron!r} is not a valid cron expression")
    return text


def next_run(cron: str, tz: str, after: datetime) -> datetime:
    """The first cron time strictly after ``after``, as an aware UTC datetime."""
    from croniter import croniter

    zone = _zone(tz) or timezone.utc
    base = after.astimezone(zone)
    nxt = croniter(cron, base).get_next(datetime)
    return nxt.astimezone(timezone.utc)


def add_schedule(
    db: Database,
    cron: str,
    file: Path | str,
    task: str,
    options: dict[str, Any] | None = None,
    *,
    model: str,
    name: str | None = None,
    tz: str | None = None,
    finish_within_s: float | None = None,
    now: datetime | None = None,
) -> int:
    """Validate and store a schedule; returns its id. ``options``: keys of OPTION_KEYS."""
    cron = check_cron(cron)
    if task not in TASKS:
        raise ScheduleError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise ScheduleError(f"{file}: no such file")
    if not os.access(path, os.R_OK):
        raise ScheduleError(f"{file}: not readable")
    tz = tz or local_zone_name()
    if _zone(tz) is None:
        raise ScheduleError(f"unknown time zone {tz!r} (use an IANA name such as Europe/Berlin)")
    opts = dict(options or {})
    unknown = set(opts) - set(OPTION_KEYS)
    if unknown:
        raise ScheduleError(f"unknown schedule option(s): {', '.join(sorted(unknown))}")
    if finish_within_s is not None:
        if finish_within_s <= 0:
            raise ScheduleError("--finish-within must be positive")
        opts["finish_within_s"] = float(finish_within_s)
    opts["timezone"] = tz
    now = now or utcnow()
    with db.session() as s:
        sch = Schedule(
            name=name,
            cron=cron,
            source_path=str(path),
            task=task,
            model=model,
            options_json=opts,
            enabled=True,
            next_run_at=next_run(cron, tz, now),
        )
        s.add(sch)
        s.flush()
        return int(sch.id)


def _info(sch: Schedule) -> ScheduleInfo:
    opts = dict(sch.options_json or {})
    return ScheduleInfo(
        id=sch.id,
        name=sch.name,
        cron=sch.cron,
        timezone=str(opts.pop("timezone", "UTC")),
        source_path=sch.source_path,
        task=sch.task,
        model=sch.model,
        options=opts,
        enabled=bool(sch.enabled),
        next_run_at=sch.next_run_at,
        last_run_at=sch.last_run_at,
        last_job_id=sch.last_job_id,
    )


def list_schedules(db: Database) -> list[ScheduleInfo]:
    with db.session() as s:
        return [_info(sch) for sch in s.scalars(select(Schedule).order_by(Schedule.id))]


def remove_schedule(db: Database, schedule_id: int) -> None:
    """Delete a schedule; jobs it created stay (their ``schedule_id`` still says where from)."""
    with db.session() as s:
        res = s.execute(delete(Schedule).where(Schedule.id == schedule_id))
        if rows_changed(res) != 1:
            raise ScheduleError(f"no schedule {schedule_id}")


def submit_options(sch: Schedule, now: datetime) -> SubmitOptions:
    opts = dict(sch.options_json or {})
    within = opts.get("finish_within_s")
    known = {f.name for f in fields(SubmitOptions)}
    kwargs = {k: opts[k] for k in OPTION_KEYS if k in opts and k in known}
    label = sch.name or f"schedule {sch.id}"
    return SubmitOptions(
        task=sch.task,
        model=sch.model,
        name=f"{label} @ {now:%Y-%m-%d %H:%M}Z",
        schedule_id=sch.id,
        finish_by=now + timedelta(seconds=float(within)) if within else None,
        **kwargs,
    )


def _claim(db: Database, sch: Schedule, now: datetime) -> bool:
    """Move next_run_at past now, only if nobody did since we read it."""
    tz = str((sch.options_json or {}).get("timezone", "UTC"))
    with db.session() as s:
        res = s.execute(
            update(Schedule)
            .where(
                Schedule.id == sch.id,
                Schedule.enabled,
                Schedule.next_run_at == sch.next_run_at,
            )
            .values(next_run_at=next_run(sch.cron, tz, now), last_run_at=now)
        )
        return rows_changed(res) == 1


def run_due_schedules(db: Database, publish: Publisher | None, now: datetime | None = None) -> list[int]:
    """Create a job for each enabled schedule whose time has come, through the same submit
    service as ``lmjobs submit``; returns the new job ids. ``publish``: None leaves the
    dispatch to the caller."""
    now = now or utcnow()
    with db.session() as s:
        due = list(
            s.scalars(
                select(Schedule)
                .where(Schedule.enabled, Schedule.next_run_at <= now)
                .order_by(Schedule.next_run_at, Schedule.id)
            )
        )
    created: list[int] = []
    for sch in due:
        if not _claim(db, sch, now):
            continue  # another tick took it
        try:
            rep = submit_file(
                db,
                Path(sch.source_path),
                submit_options(sch, now),
                publish=publish,
                allow_repeat=True,  # the same nightly file is the point of a schedule
            ).report
        except (LmjobsError, OSError) as exc:
            log.warning("schedule %s: no job this time: %s", sch.id, exc)
            continue
        with db.session() as s:
            s.execute(update(Schedule).where(Schedule.id == sch.id).values(last_job_id=rep.job_id))
        log.info("schedule %s started job %s", sch.id, rep.job_id)
        created.append(rep.job_id)
    return created
