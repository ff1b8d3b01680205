"""Times given on the command line: ``02:00`` (the next one, local time) or an ISO timestamp."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """Return an aware UTC datetime. Raises ValueError with a one-line reason."""
    now = now or datetime.now(timezone.utc)
    text = text.strip()
    local_now = now.astimezone()
    for fmt in ("%H:%M", "%H:%M:%S"):
        try:
            t = datetime.strptime(text, fmt).time()
        except ValueError:
            continue
        candidate = local_now.replace(hour=t.hour, minute=t.minute, second=t.second, microsecond=0)
        if candidate <= local_now:
            candidate += timedelta(days=1)
        return candidate.astimezone(timezone.utc)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time: use HH:MM or an ISO timestamp") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # a naive timestamp is local time
    return dt.astimezone(timezone.utc)
