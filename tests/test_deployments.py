"""deployments/ and docs/deploy.md checked against the code they describe, without a Prefect server:
- every deployment in deployments/prefect.yaml validates against the `nanochat` flow's signature through
  Prefect's own parameter schema and validation, and its `cfg` equals the preset it names;
- every work pool a deployment names is `local` (process) or is created in docs/deploy.md from a template
  in deployments/pools/, and each template is a valid Prefect work pool whose jobs, rendered by the
  worker's own job-configuration model (prefect-docker / prefect-kubernetes), get GPUs, a large /dev/shm,
  NCCL settings and the artifact root / tracking server / object store in their environment;
- docs/deploy.md quotes what `nanochat plan` prints for the d20 speedrun.
The slow test builds the GPU bundle (scripts/gpu_bundle.sh) and runs base_train from it offline, in a fresh
interpreter that sees only the bundle and a torch install, as a GPU machine without a registry would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
POOLS = REPO / "deployments" / "pools"
DOCS = REPO / "docs" / "deploy.md"
# Environment every GPU job needs: where artifacts live, where metrics go, where the object store is.
JOB_ENV = {"NANOCHAT_BASE_DIR", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "PREFECT_API_URL"}
POOL_CREATE = re.compile(r"prefect work-pool create (\S+) --type (\S+)(?: --base-job-template (\S+))?")


def deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def deployment(name: str) -> dict:
    return next(d for d in deployments() if d["name"] == name)


def names() -> list[str]:
    return [d["name"] for d in deployments()]


def template(kind: str) -> dict:
    return json.loads((POOLS / f"{kind}.json").read_text())


@pytest.fixture(scope="module")
def flow():
    from flows.nanochat import nanochat

    return nanochat


@pytest.fixture(scope="module")
def schema(flow):
    """The parameter schema Prefect stores with a deployment (what `prefect deploy` sends)."""
    from prefect.utilities.callables import parameter_schema

    return parameter_schema(flow).model_dump_for_openapi()


def validate(params: dict, schema: dict) -> None:
    """Prefect's own check of a deployment run's parameters (enforce_parameter_schema)."""
    from prefect.utilities.schema_tools.validation import validate as prefect_validate

    prefect_validate(params, schema, raise_on_error=True, ignore_required=True)


@pytest.mark.parametrize("name", names())
def test_deployment_points_at_the_nanochat_flow(name, flow):
    path, func = deployment(name)["entrypoint"].split(":")
    assert (REPO / path).is_file() and func == flow.fn.__name__ == "nanochat"


@pytest.mark.parametrize("name", names())
def test_deployment_parameters_validate_against_the_flow_signature(name, flow, schema):
    params = deployment(name)["parameters"]
    validate(params, schema)
    # ... and the engine's own casting of them into the flow's types (PipelineConfig), unknown keys refused.
    flow.validate_parameters(params)


def test_prefect_validation_rejects_a_wrong_parameter(flow, schema):
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.schema_tools.validation import ValidationError

    params = {"cfg": {"preset": "d20", "base_train": {"depth": "twenty"}}}
    with pytest.raises(ValidationError, match="depth"):
        validate(params, schema)
    with pytest.raises(ParameterTypeError):
        flow.validate_parameters({"cfg": {"preset": "d20", "base_train": {"dept": 20}}})


@pytest.mark.parametrize("name", names())
def test_deployment_cfg_equals_the_preset_it_names(name, flow):
    from nanochat_core.presets import get_preset

    cfg = flow.validate_parameters(deployment(name)["parameters"])["cfg"]
    assert cfg == get_preset(cfg.preset), f"deployment {name} drifted from preset {cfg.preset}"


def documented_pools() -> dict[str, list[tuple[str, str | None]]]:
    """{pool name: [(type, template path)]} from every `prefect work-pool create` in the docs and prefect.yaml."""
    pools: dict[str, list[tuple[str, str | None]]] = {}
    for text in (DOCS.read_text(), PREFECT_YAML.read_text()):
        for name, kind, tpl in POOL_CREATE.findall(text):
            pools.setdefault(name, []).append((kind, tpl or None))
    return pools


@pytest.mark.parametrize("name", names())
def test_work_pool_is_local_or_has_a_template(name):
    pool = deployment(name)["work_pool"]["name"]
    if pool == "local":
        assert ("process", None) in documented_pools()["local"]
        return
    created = documented_pools().get(pool, [])
    templated = [(kind, tpl) for kind, tpl in created if tpl]
    assert templated, f"pool {pool!r} of deployment {name} is created from no template in docs/deploy.md"
    for kind, tpl in templated:
        assert (REPO / tpl).is_file(), tpl
        assert Path(tpl).parent == Path("deployments/pools") and Path(tpl).stem == kind


def test_every_template_is_documented():
    documented = {tpl for entries in documented_pools().values() for _, tpl in entries if tpl}
    assert {f"deployments/pools/{p.name}" for p in POOLS.glob("*.json")} <= documented


def render(kind: str, values: dict):
    """The job configuration the `kind` worker builds from its pool's template and a run's job variables."""
    from prefect.client.orchestration import PrefectClient

    if kind == "docker":
        from prefect_docker.worker import DockerWorkerJobConfiguration as Config
    else:
        from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration as Config

    async def go():
        # A real client that is never called: nothing in the templates refers to blocks or variables, and
        # without one Prefect would start a temporary API server just to resolve nothing.
        async with PrefectClient(api="http://127.0.0.1:9/api") as client:
            return await Config.from_template_and_values(template(kind), values, client=client)

    return asyncio.run(go())


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_template_is_a_valid_work_pool_of_its_type(kind):
    # The server's own model: what `prefect work-pool create --base-job-template` is checked against.
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools.validation import is_valid_schema, validate

    if kind == "docker":
        from prefect_docker.worker import DockerWorker as Worker
    else:
        from prefect_kubernetes.worker import KubernetesWorker as Worker
    tpl = template(kind)
    WorkPoolCreate(name="gpu", type=Worker.type, base_job_template=tpl)  # placeholders all declared
    is_valid_schema(tpl["variables"])
    defaults = {k: v["default"] for k, v in tpl["variables"]["properties"].items() if "default" in v}
    validate(defaults, tpl["variables"], raise_on_error=True, ignore_required=True)
    default = Worker.get_default_base_job_template()
    # Everything the worker's own default template lets a user set is still settable.
    assert set(default["variables"]["properties"]) - {"container_create_kwargs"} <= set(tpl["variables"]["properties"])


def test_template_with_an_undeclared_placeholder_is_refused():
    from prefect.server.schemas.actions import WorkPoolCreate

    tpl = template("docker")
    tpl["job_configuration"]["container_create_kwargs"]["shm_size"] = "{{ shm_sise }}"
    with pytest.raises(ValueError, match="shm_sise"):
        WorkPoolCreate(name="gpu", type="docker", base_job_template=tpl)


def test_docker_jobs_get_gpus_shared_memory_and_environment():
    cfg = render("docker", {"env": {"EXTRA": "1"}, "gpu_count": 4})
    kwargs = cfg.container_create_kwargs
    assert kwargs["device_requests"] == [{"driver": "nvidia", "count": 4, "capabilities": [["gpu"]]}]
    assert kwargs["shm_size"] == "32g"
    assert {"name": "memlock", "soft": -1, "hard": -1} in kwargs["ulimits"]
    # The template's environment and a deployment's own `env` are merged, not replaced.
    assert JOB_ENV | {"NCCL_DEBUG", "EXTRA"} <= set(cfg.env)
    assert cfg.image.startswith("nanochat-flow:") and cfg.stream_output


def test_docker_device_requests_are_accepted_by_the_docker_sdk():
    from docker.types import HostConfig

    kwargs = render("docker", {}).container_create_kwargs
    host = HostConfig(version="1.45", device_requests=kwargs["device_requests"], shm_size=kwargs["shm_size"],
                      ulimits=kwargs["ulimits"])
    assert host["DeviceRequests"][0]["Capabilities"] == [["gpu"]] and host["DeviceRequests"][0]["Count"] == -1
    assert host["ShmSize"] == 32 * 1024**3


def test_kubernetes_jobs_get_gpus_shared_memory_and_environment():
    cfg = render("kubernetes", {"gpus": 8, "env": {"EXTRA": "1"}})
    pod = cfg.job_manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "nanochat-data"
    assert JOB_ENV | {"NCCL_DEBUG", "EXTRA"} <= set(cfg.env)
    assert cfg.env["NANOCHAT_BASE_DIR"].startswith("/data/")


def test_kubernetes_pod_runs_as_the_image_user():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    uid = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    pod = template("kubernetes")["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    security = pod["containers"][0]["securityContext"]
    assert uid and security["runAsNonRoot"] and security["runAsUser"] == int(uid.group(1))


def test_docker_template_joins_the_local_stack(compose_config):
    """Containers of the docker pool reach the stack's services by name, on its network and volume."""
    cfg = render("docker", {})
    assert cfg.networks == [compose_config["networks"]["default"]["name"]]
    volume, target = cfg.volumes[0].split(":")[:2]
    assert compose_config["volumes"]["nanochat-data"]["name"] == volume
    assert cfg.env["NANOCHAT_BASE_DIR"].startswith(target + "/")
    services = compose_config["services"]
    for var, service in [("PREFECT_API_URL", "prefect-server"), ("MLFLOW_TRACKING_URI", "mlflow"),
                         ("AWS_ENDPOINT_URL", "s3")]:
        host, port = re.match(r"https?://([^:/]+):(\d+)", cfg.env[var]).groups()
        assert host == service and int(port) in {int(p["target"]) for p in services[service].get("ports", [])}, var


@pytest.fixture(scope="module")
def compose_config():
    from test_docker_static import compose

    return compose("docker/compose.yaml")


def plan_output(argv: list[str]) -> str:
    from nanochat_core.plan import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv)
    return out.getvalue()


def test_docs_quote_the_d20_plan():
    docs = DOCS.read_text()
    for line in plan_output(["--preset", "d20", "--nproc-per-node", "8"]).splitlines():
        assert line.strip() in docs, f"docs/deploy.md lacks this line of `nanochat plan --preset d20`: {line}"


def test_docs_give_each_preset_its_command():
    docs = DOCS.read_text()
    for command in ["--preset d20", "--preset d12", "--preset tiny", "docker compose -f docker/compose.yaml up",
                    "scripts/gpu_bundle.sh", "NANOCHAT_RDZV_ENDPOINT", "--rdzv_backend=c10d"]:
        assert command in docs, command


# --- the GPU bundle --------------------------------------------------------------------------------------


def torch_site(dest: Path) -> Path:
    """A directory holding only torch and what it imports, linked from this venv: the GPU machine's torch."""
    dest.mkdir()
    todo, seen = ["torch"], set()
    while todo:
        name = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0])
        tops = {Path(f).parts[0] for f in dist.files or [] if not Path(f).parts[0].endswith((".dist-info", ".."))}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (dest / top).exists() and top != "bin":
                (dest / top).symlink_to(src)
    return dest


@pytest.mark.slow
def test_gpu_bundle_trains_offline_from_what_it_carries(tmp_path):
    from pretrain_data import make_pretraining_inputs

    base = tmp_path / "base"
    make_pretraining_inputs(str(base), vocab_size=512)
    bundle = tmp_path / "bundle"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    build = subprocess.run(["bash", "scripts/gpu_bundle.sh", str(bundle), "--python-version", py, "--base", str(base)],
                           cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels = [p.name for p in (bundle / "wheels").glob("*.whl")]
    assert any(w.startswith("tokenizer_rs-") and "abi3" in w for w in wheels)
    assert not [w for w in wheels if w.startswith(("torch-", "triton-", "nvidia_", "prefect", "mlflow"))]
    assert sorted(p.name for p in (bundle / "base" / "base_data").iterdir()) == \
        sorted(p.name for p in (base / "base_data").glob("shard_*.parquet"))

    # A fresh interpreter (no project venv) that sees torch and nothing else, like the GPU machine.
    venv = tmp_path / "gpu-python"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "machine_torch.pth").write_text(str(torch_site(tmp_path / "machine-torch")) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "NANOCHAT_"))}
    env.update(PYTHON=str(venv / "bin" / "python"), NPROC="1", PATH=f"{venv / 'bin'}:{env['PATH']}",
               PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    run = subprocess.run(
        ["bash", str(bundle / "run.sh"), "--preset", "tiny", "--depth", "2", "--max-seq-len", "64",
         "--device-batch-size", "4", "--total-batch-size", "256", "--num-iterations", "3", "--eval-every", "-1",
         "--eval-tokens", "256", "--no-compile"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((bundle / "base" / "base_checkpoints" / "d2" / "result.json").read_text())
    assert result["step"] == result["num_iterations"] == 3
    # Nothing was imported from the project's own environment.
    probe = subprocess.run([env["PYTHON"], "-c", "import pydantic, sys; print(pydantic.__file__)"],
                           env={**env, "PYTHONPATH": str(bundle / "site")}, capture_output=True, text=True)
    assert probe.stdout.startswith(str(bundle / "site")), probe.stdout + probe.stderr
