"""Engine faults: errors that say the engine or its libraries are broken, not a request.

A request that is too long, or that a template refuses, fails alone. When every request of
a chunk fails with the same error of the kinds below (an AttributeError from a library that
changed, a missing kernel, a CUDA error other than out-of-memory), the chunk service stops
the job with that one error instead of writing rows that blame the data (DESIGN.md item 10).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmjobs.db.models import ResultStatus

# Errors that say the engine or its libraries are broken, not that a request is bad
# (DESIGN.md item 10). Out-of-memory is not one: the engine splits the batch for it.
_FAULT_TYPES = frozenset(
    {
        "AttributeError",
        "ImportError",
        "ModuleNotFoundError",
        "NameError",
        "NotImplementedError",
        "TypeError",
        "AcceleratorError",
        "CudaError",
    }
)
_FAULT_TEXT = ("CUDA error", "no kernel image", "not implemented for", "CUBLAS_STATUS", "cuDNN error")


def is_fault_text(error: str) -> bool:
    """Does an engine error (``"TypeName: message"``) come from the engine, not the request?"""
    if "out of memory" in error.lower():
        return False
    kind = error.split(":", 1)[0].strip()
    return kind in _FAULT_TYPES or any(t in error for t in _FAULT_TEXT)


def engine_fault(rows: Sequence[dict[str, Any]]) -> str | None:
    """The one error when every generated row failed with it and it is an engine fault."""
    errors = {r["error"] for r in rows if not r["deduplicated"]}
    if not rows or any(r["status"] != ResultStatus.FAILED.value for r in rows) or len(errors) != 1:
        return None
    error = next(iter(errors))
    return error if error and is_fault_text(error) else None
