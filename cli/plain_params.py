"""Option values read without pydantic when they are plainly written.

Typer 0.28+ coerces every option and argument value through a pydantic ``TypeAdapter``
built on first use, so even ``lmjobs status 7 --json`` imports pydantic (about 0.15 s of a
start-up that should stay well under a second). :func:`install` wraps Typer's builder of
that coercion so that every parameter gets :class:`PlainParam`: a value of a parameter whose
type is exactly ``int``, ``float``, ``str`` or ``bool`` (no bounds, parser or file) is taken
as it is when it has that type, and read without pydantic when it is a string written in
the one form whose meaning is beyond doubt (digits for an integer, digits with at most one
point for a float, any text for a string), giving what pydantic gives. Any other value
(``" 5"``, ``1e3``, ``abc``, a path) goes to the coercion Typer would have used, built on
first need, which accepts what it accepts and words every error as before; so this never
refuses a value on its own (the same rule as ``jobs/plain_settings.py``). An option left at
its ``None`` default builds nothing.

With a Typer that has no such builder (older releases coerce through click alone),
:func:`install` changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})(?:\.[0-9]{1,17})?")
_PLAIN_TYPES = (int, float, str, bool)


def plain_value(annotation: type, value: Any) -> tuple[bool, Any]:
    """``(True, the value pydantic would give)`` for a plainly written ``value`` of
    ``annotation`` (int, float or str); else ``(False, None)``: pydantic's to decide."""
    if type(value) is annotation:
        return True, value
    if type(value) is not str:
        return False, None
    if annotation is int and _INT.fullmatch(value):
        return True, int(value)
    if annotation is float and _FLOAT.fullmatch(value):
        return True, float(value)
    return False, None


# Typer releases (major, minor) with ``core.build_runtime_param`` and ``_coercion.RuntimeParam``
# as this module wraps them.
KNOWN_TYPER = frozenset({(0, 28), (0, 29)})


def _release(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def install() -> bool:
    """Route plain parameters of every Typer command through :class:`PlainParam`; True
    when this Typer has the pydantic coercion to route around."""
    try:
        import typer
        from typer import _coercion, core
    except ImportError:
        return False
    # Only the releases whose private builder this was written against and tested with: a
    # later Typer keeps its own pydantic coercion (slower to start, never wrong).
    if _release(typer.__version__) not in KNOWN_TYPER:
        return False
    original = getattr(core, "build_runtime_param", None)
    base = getattr(_coercion, "RuntimeParam", None)
    if original is None or base is None or getattr(original, "_lmjobs_plain", False):
        return original is not None and base is not None
    typers_own: Callable[[Any], Any] = original

    @dataclass(frozen=True, eq=False)
    class PlainParam(base):  # type: ignore[misc, valid-type]
        """A plain value as it is; any other through Typer's own coercion, built on first
        need (an option left at ``None`` never builds it)."""

        descriptor: Any = None
        built: list[Any] = field(default_factory=list)

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if self.annotation in _PLAIN_TYPES and self.plain:
                ok, out = plain_value(self.annotation, value)
                if ok:
                    return out
            if not self.built:
                self.built.append(typers_own(self.descriptor))
            return self.built[0]._coerce_value(value, param=param, ctx=ctx)

        @property
        def plain(self) -> bool:
            info = self.parameter_info
            return (
                getattr(self.descriptor, "file_annotation", None) is None
                and getattr(info, "parser", None) is None
                and getattr(info, "min", None) is None
                and getattr(info, "max", None) is None
            )

    def build(descriptor: Any) -> Any:
        return PlainParam(
            parameter_info=descriptor.parameter_info, annotation=descriptor.annotation, descriptor=descriptor
        )

    build._lmjobs_plain = True  # type: ignore[attr-defined]
    core.build_runtime_param = build
    return True
