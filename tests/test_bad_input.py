"""Bad input at the edges (issue 25): each mistake a new user makes at the CLI ends in one sentence that
names the problem and the fix, exit status 2, no traceback and nothing half-written; the cases that used to
be silently wrong give the correct result. Commands run as the user runs them, in a subprocess."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from download_fixtures import moto_port, point_s3_at  # noqa: F401 (moto_port: a fixture)

from nanochat_core import checkpoint
from nanochat_core.config import PipelineConfig
from nanochat_core.errors import UserError
from nanochat_core.presets import PRESETS, get_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nanochat(*args: str, env: dict[str, str] | None = None, cwd: str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """`nanochat ARGS` as a user types it, with the test's base dir (conftest) unless `env` says otherwise."""
    full = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}  # a CPU node, whatever runs the tests
    return subprocess.run([sys.executable, "-m", "nanochat_core.cli", *args], env=full, cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The one-sentence refusal: status 2, no traceback, a last line `error: ...` holding `words`."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr[-2000:]
    for word in words:
        assert word in line, (word, line)
    return line


def files_under(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def write_source(root: str, n: int = 3) -> list[str]:
    """`n` zstd shards of 3 row groups each, as a source directory (shard_00000.parquet, ...)."""
    os.makedirs(root, exist_ok=True)
    rng, paths = random.Random(0), []
    for i in range(n):
        texts = [" ".join(f"word{rng.randint(0, 10**6)}" for _ in range(150)) for _ in range(300)]
        path = os.path.join(root, f"shard_{i:05d}.parquet")
        pq.write_table(pa.table({"text": texts}), path, compression="zstd", row_group_size=100)
        paths.append(path)
    return paths


def corrupt_middle(path: str) -> None:
    """Zero 64 bytes in the middle of a row group: the footer still reads, the data does not decode."""
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    open(path, "wb").write(bytes(data))


# --- where artifacts go -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["download", "--preset", "tiny"], ["corpus", "build", "--preset", "tiny"],
                                     ["tok-train", "--preset", "tiny"]])
def test_unwritable_base_dir_is_refused_before_any_work(command):
    line = refused(nanochat(*command, env={"NANOCHAT_BASE_DIR": "/proc/nanochat"}), "cannot write to /proc/nanochat")
    assert "NANOCHAT_BASE_DIR" in line


def test_object_store_without_credentials(moto_port, tmp_path):
    no_credentials = {"NANOCHAT_BASE_DIR": "s3://nobucket/x", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{moto_port}",
                      "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
                      "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_ACCESS_KEY_ID": "",
                      "AWS_SECRET_ACCESS_KEY": ""}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for command in (["tok-train", "--preset", "tiny"], ["chat", "--checkpoint", "s3://nobucket/x/ckpt", "-p", "hi"]):
        proc = subprocess.run([sys.executable, "-m", "nanochat_core.cli", *command],
                              env={**env, **{k: v for k, v in no_credentials.items() if v}},
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        refused(proc, "no credentials", "AWS_ACCESS_KEY_ID")


def test_object_store_bucket_that_does_not_exist(moto_port, monkeypatch):
    point_s3_at(monkeypatch, f"http://127.0.0.1:{moto_port}")
    proc = nanochat("download", "--preset", "tiny", env={"NANOCHAT_BASE_DIR": "s3://nobucket/x"})
    refused(proc, "cannot write to s3://nobucket/x/base_data")


def test_out_onto_another_stages_directory_is_refused(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    record = json.dumps({"stage": "tok_train", "path": str(tokenizer)})
    (tokenizer / "result.json").write_text(record)
    refused(nanochat("base-train", "--preset", "tiny", "--out", str(tokenizer)), "output of stage tok_train", "--out")
    assert (tokenizer / "result.json").read_text() == record and files_under(tokenizer) == ["result.json"]


# --- shards -------------------------------------------------------------------------------------------


def test_download_refuses_a_shard_whose_middle_is_corrupt(tmp_path):
    source = write_source(str(tmp_path / "source"))
    corrupt_middle(source[1])
    proc = nanochat("download", "--preset", "tiny", "-n", "2", "--url-template", str(tmp_path / "source"))
    refused(proc, "shard_00001.parquet is not a usable shard at the source", "does not decode")
    kept = os.listdir(os.environ["NANOCHAT_BASE_DIR"] + "/base_data")
    assert "shard_00001.parquet" not in kept and not [n for n in kept if ".tmp-" in n]


def test_download_names_a_truncated_source_not_a_temp_file(tmp_path, monkeypatch, capsys):
    from nanochat_core.stages import download

    monkeypatch.setattr("nanochat_core.data.download.BACKOFF_SECONDS", 0.01)
    source = write_source(str(tmp_path / "source"))
    data = open(source[0], "rb").read()
    open(source[0], "wb").write(data[:len(data) // 2])  # the source itself cut short: every fetch agrees
    with pytest.raises(SystemExit) as exc:
        download.main(["--preset", "tiny", "-n", "2", "--url-template", str(tmp_path / "source")])
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "shard_00000.parquet is not a usable shard at the source" in line and ".tmp-" not in line


def test_download_template_without_index():
    proc = nanochat("download", "--preset", "tiny", "--url-template", "https://example.invalid/data/shard.parquet")
    refused(proc, "has no {index}", "shard_{index:05d}.parquet")


def test_reading_a_corrupt_or_textless_shard_names_it(tmp_path):
    base = os.environ["NANOCHAT_BASE_DIR"]
    source = write_source(os.path.join(base, "base_data"))
    corrupt_middle(source[0])
    refused(nanochat("tok-train", "--preset", "tiny"), "shard_00000.parquet row group", "nanochat download")
    pq.write_table(pa.table({"body": ["no text column"] * 10}), source[0])
    refused(nanochat("tok-train", "--preset", "tiny"), "shard_00000.parquet has no `text` column")
    assert not os.path.exists(os.path.join(base, "tokenizer"))


# --- config and task files ------------------------------------------------------------------------------


def test_config_that_is_a_directory_or_not_json(tmp_path):
    refused(nanochat("tok-train", "--config", str(tmp_path)), f"config file {tmp_path} is a directory")
    bad = tmp_path / "cfg.json"
    bad.write_text("{preset: tiny")
    line = refused(nanochat("tok-train", "--config", str(bad)), "is not valid JSON")
    assert " for :" not in line


def test_custom_task_that_is_a_directory_or_has_no_assistant_turn(tmp_path):
    from nanochat_core.tasks import build_task

    with pytest.raises(UserError, match="is a directory; pass the path of a JSONL file"):
        build_task(f"custom@{tmp_path}")
    # At the command line the task file is checked before any model is looked for or loaded.
    refused(nanochat("sft", "--preset", "tiny", "--tasks", f"custom@{tmp_path}"), f"{tmp_path} is a directory")
    # 60 user-only lines used to train at loss 0 and write a checkpoint that learned nothing.
    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                             for i in range(60)))
    with pytest.raises(UserError, match="line 1: the conversation has no assistant turn"):
        build_task(f"custom@{convs}")


# --- the pipeline command -----------------------------------------------------------------------------


def test_speedrun_stage_names_map_or_are_refused():
    from flows.nanochat import stage_list

    assert stage_list(["rl", "chat-eval", "tok_eval"], "skip") == ["chat_rl", "chat_eval", "tok_eval"]
    assert stage_list(["base-train", "sft"], "refresh") == ["base_train", "chat_sft"]
    with pytest.raises(UserError, match="--refresh 'bogus': no such stage; stages are corpus, download"):
        stage_list(["bogus"], "refresh")


def test_flow_refuses_a_gpu_preset_on_a_cpu_node(monkeypatch):
    """A deployment run (the UI, prefect.yaml) never passes through the speedrun command's check."""
    from flows.nanochat import nanochat as flow

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="preset d20 is sized for GPUs"):
        flow.fn(get_preset("d20"))


@pytest.mark.slow  # three Prefect imports on a busy box: ~30 s
def test_speedrun_refuses_before_the_flow_starts():
    refused(nanochat("speedrun", "--refresh", "bogus"), "--refresh 'bogus': no such stage", "base_train")
    refused(nanochat("speedrun", "--skip", "base-train"), "cannot skip base_train", "skippable")
    refused(nanochat("speedrun", "--preset", "d12"), "preset d12 is sized for GPUs", "base_train.device_type=cpu")
    refused(nanochat("speedrun", env={"NANOCHAT_BASE_DIR": "/proc/nanochat"}), "cannot write to /proc/nanochat")


def test_gpu_preset_is_refused_on_a_cpu_node_unless_forced(monkeypatch):
    from nanochat_core.stage_args import refuse_gpu_preset_on_cpu

    refused(nanochat("base-train", "--preset", "d20"), "preset d20 is sized for GPUs", "--device-type cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what hardware.node_devices reads: a CPU node
    d20 = get_preset("d20")
    forced = d20.model_copy(update={"base_train": d20.base_train.model_copy(update={"device_type": "cpu"})})
    refuse_gpu_preset_on_cpu(forced, ["base_train"], "--device-type cpu")  # forced: no refusal
    # Stages that only prepare data serve GPU runs prepared on CPU machines.
    refuse_gpu_preset_on_cpu(d20, ["download", "tok_train", "corpus", "eval_bundle"], "--device-type cpu")
    with pytest.raises(UserError, match="preset d20 is sized for GPUs"):
        refuse_gpu_preset_on_cpu(d20, ["chat_eval"], "--device-type cpu")


def test_plan_for_sample_shards_and_for_cpu(capsys):
    from nanochat_core import plan

    plan.main(["--preset", "tiny"])
    tiny = capsys.readouterr().out
    assert "0.00 epochs" not in tiny and "0.15 epochs" in tiny
    plan.main(["--gpu", "cpu"])
    cpu = capsys.readouterr().out
    assert "checkpoints every 1 steps" not in cpu and "after every step" in cpu and "sized for GPUs" in cpu


# --- the API ----------------------------------------------------------------------------------------------


def test_a_preset_named_in_data_is_that_preset():
    assert PipelineConfig(preset="d12") == get_preset("d12")
    assert PipelineConfig.model_validate({"preset": "d12", "base_train": {"depth": 10}}).base_train.depth == 10
    for name in PRESETS:
        cfg = get_preset(name)
        assert PipelineConfig.model_validate(cfg.model_dump()) == cfg
        assert PipelineConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValueError, match="unknown preset 'd13'"):
        PipelineConfig(preset="d13")


def test_resume_passes_over_a_meta_that_does_not_parse(tmp_path):
    import torch

    ckpt, said = str(tmp_path / "ckpt"), []
    for step in (1, 2):
        checkpoint.save_checkpoint(ckpt, step, 0, {"w": torch.zeros(2)}, {},
                                   {"step": step, "run_key": "k", "num_iterations": 10})
    (tmp_path / "ckpt" / checkpoint.meta_file(2)).write_text('{"step": 2, "run_k')  # a save cut short
    step = checkpoint.continue_or_start(ckpt, "k", True, lambda: None, said.append, force=True)
    assert step == 1
    assert any(checkpoint.meta_file(2) in line and "continuing from step 1" in line for line in said)


@pytest.mark.slow
def test_chat_finds_a_registered_model_from_any_directory(tmp_path):
    from serve_fixtures import make_tiny_checkpoint

    from nanochat_core import mlflow_model, tracking

    base = os.environ["NANOCHAT_BASE_DIR"]  # MLflow's store is <base>/mlflow.db, as the pipeline logs it
    env = dict(os.environ)  # before MLflow exports its tracking URI below
    run_id = tracking.start_pipeline_run("bad-input", {}, {})
    mlflow_model.register_checkpoint(run_id, make_tiny_checkpoint(base, family="chatsft_checkpoints"), 0, "sft")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "nanochat_core.cli", "chat", "--checkpoint", "models:/nanochat@sft",
                           "-p", "hi", "--max-tokens", "4"], env=env, cwd=elsewhere, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.listdir(elsewhere) == []  # no stray ./mlflow.db


@pytest.mark.slow  # botocore and s3fs retry the connection for ~10 s before giving up
def test_object_store_endpoint_that_does_not_answer():
    proc = nanochat("corpus", "build", "--preset", "tiny",
                    env={"NANOCHAT_BASE_DIR": "s3://nobucket/x", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                         "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                         "AWS_EC2_METADATA_DISABLED": "true"})
    refused(proc, "cannot reach the object store", "AWS_ENDPOINT_URL")
