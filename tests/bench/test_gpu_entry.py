"""The GPU benchmark's entry point runs where only torch, transformers and tokenizers are
installed (the device machine's image): no pydantic, SQLAlchemy, Celery or Redis, and no
install of lmjobs (``bench/launch.py`` maps the checkout). A module of that path that
starts importing one of them fails this test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmjobs.bench.arms import shape_warmup_requests

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "bench" / "launch.py"
# what the device image lacks (PITFALLS.md, "Versions")
BLOCKED = ("pydantic", "pydantic_settings", "sqlalchemy", "alembic", "celery", "kombu", "redis", "psycopg")

BLOCKER = f'''
import sys

BLOCKED = {BLOCKED!r}


class Blocker:
    """Every import of a blocked top-level package fails, as on the device machine."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
'''


def _env(tmp_path: Path) -> dict[str, str]:
    import os

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.slow
def test_gpu_entry_runs_without_pydantic_sqlalchemy_celery_redis(tmp_path: Path) -> None:
    env = _env(tmp_path)
    # the blocker works: without it this test could not fail
    probe = subprocess.run(
        [sys.executable, "-c", "import sqlalchemy"], env=env, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr

    out = tmp_path / "bench.json"
    args = (
        "--preset cpu-tiny --device cpu --dtype float32 --arms A0,A1,A2,A5,E2E --requests 3 "
        "--a0-requests 3 --max-batch-size 2 --naive-batch 2 --warmup shapes --threads 1"
    ).split()
    proc = subprocess.run(
        [sys.executable, str(LAUNCH), *args, "--json-out", str(out)],
        env=env,
        cwd=tmp_path,  # not the checkout: the launcher alone must find lmjobs
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    arms = {a["arm"]: a for a in report["arms"]}
    assert set(arms) == {"A0", "A1", "A2", "A5"}
    assert "sqlalchemy" in report["skipped"]["E2E"] and "celery" in report["skipped"]["E2E"]
    assert "| A2 |" in proc.stdout  # the Markdown table
    # the machine's speed, probed before and after the arms: a line when it moved
    speed = report["meta"]["machine_speed"]
    assert set(speed["probes_gflop_per_s"]) == {"start", "end"}
    assert ("matmul rate ranged" in proc.stdout) == (not speed["steady"])
    assert arms["A1"]["label"] == "model.generate, batches of 2, input order"
    for name in ("A1", "A2", "A5"):
        assert arms[name]["correctness_vs_a0"]["identical_pct"] == 100.0, name
        assert arms[name]["output_tokens"] == arms["A0"]["output_tokens"] > 0
    # warmed at the timed shapes: first batch of 2 and the last, partial one of 1
    assert arms["A2"]["warmup"]["requests"] == 3
    assert arms["A5"]["warmup"]["decode_shapes_not_warmed"] == 0
    assert arms["A0"]["warmup"]["requests"] == 1


def test_shape_warmup_takes_the_first_and_the_last_batch() -> None:
    reqs = list(range(10))
    assert shape_warmup_requests(reqs, 4) == [0, 1, 2, 3, 8, 9]
    assert shape_warmup_requests(reqs, 5) == [0, 1, 2, 3, 4]
    assert shape_warmup_requests(reqs[:3], 8) == [0, 1, 2]
