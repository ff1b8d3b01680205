"""Queue names: one Celery queue per model, so a worker only receives work for the model it holds."""

from __future__ import annotations

import hashlib
import re

PREFIX = "lmjobs"
CONTROL_QUEUE = f"{PREFIX}.control"  # reconciler and scheduler ticks


def queue_for_model(model: str) -> str:
    """``Qwen/Qwen2.5-0.5B`` -> ``lmjobs.qwen-qwen2.5-0.5b``; long or odd names get a hash suffix."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", model.lower()).strip("-.")
    if len(slug) > 80 or slug != model.lower().replace("/", "-"):
        digest = hashlib.sha256(model.encode()).hexdigest()[:8]
        slug = f"{slug[:70]}-{digest}"
    return f"{PREFIX}.{slug or 'model'}"


def broker_priority(job_priority: int) -> int:
    """Job priority (higher first, any int) -> Redis transport priority (0 is highest, 0..9)."""
    return max(0, min(9, 5 - job_priority))
