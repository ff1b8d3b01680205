"""The import contract of DESIGN.md ("Folders"): the contracts in pyproject.toml hold on this
tree, and a deliberately wrong import breaks the contract that forbids it.

lint-imports runs as a subprocess on a tree laid out as installed (``<src>/lmjobs/cli`` ...):
links to this checkout's folders for the real tree, copies for the broken ones. So the test
checks this checkout whatever the virtual environment's editable install points at.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # import-linter depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("cli", "api", "jobs", "worker", "db", "bench")
CONTRACTS: dict[str, str] = {
    c["id"]: c["name"]
    for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
}


def lint_imports(workdir: Path, src: Path, contract: str) -> subprocess.CompletedProcess[str]:
    """Run one contract with the pyproject.toml in workdir on the packages found under src."""
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "500", "NO_COLOR": "1"}
    return subprocess.run(
        [str(exe), "--no-logo", "--no-cache", "--contract", contract],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def kept(proc: subprocess.CompletedProcess[str], contract: str) -> bool:
    out = proc.stdout + proc.stderr
    if proc.returncode == 0 and f"{CONTRACTS[contract]} KEPT" in out and "1 kept, 0 broken" in out:
        return True
    assert proc.returncode == 1 and f"{CONTRACTS[contract]} BROKEN" in out, out  # broken, not an error
    return False


def test_the_contracts_are_the_ones_design_asks_for() -> None:
    assert set(CONTRACTS) == {"layers", "jobs", "db", "engine", "api"}


@pytest.mark.parametrize("contract", sorted(CONTRACTS))
def test_contract_holds_on_this_tree(contract: str, tmp_path: Path) -> None:
    src = tmp_path / "src" / "lmjobs"
    src.mkdir(parents=True)
    for folder in FOLDERS:
        (src / folder).symlink_to(ROOT / folder, target_is_directory=True)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    proc = lint_imports(tmp_path, src.parent, contract)
    assert "Analyzed" in proc.stdout, proc.stdout + proc.stderr  # it found the packages
    assert kept(proc, contract), proc.stdout


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the packages (as lmjobs.*) and pyproject.toml, free to be broken."""
    src = tmp_path / "src" / "lmjobs"
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def add_import(tree: Path, package: str, statement: str) -> None:
    init = tree / "src" / "lmjobs" / package / "__init__.py"
    init.write_text(init.read_text() + f"\n{statement}\n")


# (contract, package that gets the import, the import, the import chain lint-imports names)
WRONG_IMPORTS = [
    ("layers", "jobs", "import lmjobs.worker.tasks", "lmjobs.jobs -> lmjobs.worker.tasks"),
    ("layers", "jobs", "import lmjobs.cli.render", "lmjobs.jobs -> lmjobs.cli.render"),
    ("layers", "worker", "import lmjobs.bench.runner", "lmjobs.worker -> lmjobs.bench.runner"),
    ("layers", "bench", "import lmjobs.cli.main", "lmjobs.bench -> lmjobs.cli.main"),
    ("layers", "api", "import lmjobs.worker.tasks", "lmjobs.api -> lmjobs.worker.tasks"),
    ("layers", "api", "import lmjobs.cli.render", "lmjobs.api -> lmjobs.cli.render"),
    ("layers", "jobs", "import lmjobs.api.app", "lmjobs.jobs -> lmjobs.api.app"),
    ("api", "worker", "import lmjobs.api.app", "lmjobs.worker -> lmjobs.api.app"),
    ("api", "bench", "import lmjobs.api.routes", "lmjobs.bench -> lmjobs.api.routes"),
    ("jobs", "jobs", "import torch", "lmjobs.jobs -> torch"),
    ("jobs", "jobs", "from celery import Celery", "lmjobs.jobs -> celery"),
    ("db", "db", "import lmjobs.jobs.settings", "lmjobs.db -> lmjobs.jobs.settings"),
    ("db", "db", "import lmjobs.worker.app", "lmjobs.db -> lmjobs.worker.app"),
    ("engine", "worker/engine", "import sqlalchemy", "lmjobs.worker.engine -> sqlalchemy"),
    ("engine", "worker/engine", "import redis", "lmjobs.worker.engine -> redis"),
    ("engine", "worker/engine", "import lmjobs.db.session", "lmjobs.worker.engine -> lmjobs.db.session"),
    ("engine", "worker/engine", "import lmjobs.worker.tasks", "lmjobs.worker.engine -> lmjobs.worker.tasks"),
    # indirectly: jobs.chunks reaches SQLAlchemy (and the engine may use only engine_api and errors)
    ("engine", "worker/engine", "import lmjobs.jobs.chunks", "lmjobs.worker.engine -> lmjobs.jobs.chunks"),
]


def names(chain: str, output: str) -> bool:
    """Whether lint-imports reports an import chain starting with ``chain`` (``- a -> b (l.3)``)."""
    return re.search(rf"^-\s+{re.escape(chain)} \(l\.\d+", output, flags=re.MULTILINE) is not None


@pytest.mark.parametrize(("contract", "package", "statement", "chain"), WRONG_IMPORTS)
def test_a_wrong_import_breaks_its_contract(
    tree: Path, contract: str, package: str, statement: str, chain: str
) -> None:
    src = tree / "src"
    assert not names(chain, lint_imports(tree, src, contract).stdout)  # not there before
    add_import(tree, package, statement)
    proc = lint_imports(tree, src, contract)
    assert not kept(proc, contract)
    assert names(chain, proc.stdout), proc.stdout


@pytest.mark.parametrize("statement", ["import lmjobs.jobs.engine_api", "import lmjobs.jobs.errors"])
def test_the_engine_may_use_the_engine_interface_and_errors(tree: Path, statement: str) -> None:
    add_import(tree, "worker/engine", statement)
    assert kept(lint_imports(tree, tree / "src", "engine"), "engine")
