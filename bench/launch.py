"""Run a module of this checkout as ``lmjobs.*`` without installing it: the device machine
gets a copy of the working tree, and ``pip install -e .`` would need packages its image
lacks (pydantic, SQLAlchemy, Celery, ...).

    python bench/launch.py [--module lmjobs.bench.gpu] [ARGS...]

The checkout's folders (``bench``, ``worker``, ``jobs``, ``db``, ...) install as
``lmjobs.bench``, ``lmjobs.worker``, ... (pyproject.toml's package-dir: each folder under
its own name), so a namespace package ``lmjobs`` whose only path is the checkout's root maps
them exactly, as the links of ``make typecheck-tree`` do. It is put in ``sys.modules``
before anything imports ``lmjobs``, so an installed copy elsewhere is never used. Standard
library only.
"""

from __future__ import annotations

import importlib.machinery
import runpy
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODULE = "lmjobs.bench.gpu"


def map_checkout(root: Path = ROOT) -> None:
    """Make ``import lmjobs.X`` load ``root/X``."""
    here = str(Path(__file__).resolve().parent)
    # ``python bench/launch.py`` put bench/ first on sys.path: its modules (config, models,
    # report, ...) must not shadow top-level packages of the same name
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(here)]
    spec = importlib.machinery.ModuleSpec("lmjobs", None, is_package=True)
    spec.submodule_search_locations = [str(root)]
    package = types.ModuleType("lmjobs")
    package.__spec__ = spec
    package.__path__ = [str(root)]
    sys.modules["lmjobs"] = package


def main(argv: list[str]) -> None:
    module = DEFAULT_MODULE
    if len(argv) >= 2 and argv[0] == "--module":
        module, argv = argv[1], argv[2:]
    map_checkout()
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
