"""nanochat checkpoints as MLflow models: the pyfunc wrapper, registration under moving aliases, and
`models:/` URIs back to a loadable checkpoint.

    uri = register_checkpoint(run_id, ckpt_dir, step=20, family="sft")   # models:/nanochat/3, now @sft
    record_chatcore(uri, 0.21)                                          # @champion if the best so far
    mlflow.pyfunc.load_model("models:/nanochat@sft").predict({"messages": [{"role": "user", "content": "hi"}]})
    nanochat serve --checkpoint models:/nanochat@champion

A version owns a copy of what it needs: the final step's model and meta files (no optimizer state) and
the tokenizer the meta points at, logged as the pyfunc model of the stage's child run:
    artifacts/checkpoint/model_<step>.pt, meta_<step>.json      artifacts/tokenizer/tokenizer.pkl, ...
so a later run that moves the checkpoint directory aside or prunes it cannot break the version, and a
tracking server (which refuses a local path as a version's source) stores it like any other artifact.
The copy costs the checkpoint's size once per version (d20: ~2 GB) against a model that always loads.

No torch at import: the flow process registers models; only loading a model imports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import warnings
from importlib import metadata
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.tracking._model_registry import utils as _registry_utils
from mlflow.tracking._tracking_service import utils as _tracking_utils

from nanochat_core import storage
from nanochat_core.paths import join
from nanochat_core.tracking import MODEL_NAME, client, tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"  # the alias on the version with the best ChatCORE so far
ARTIFACT_NAME = "model"
# mlflow's fluent API (what log_model and register_model use) reads a process-wide tracking URI; the
# flow registers from several task threads, so one at a time sets it and logs.
_fluent = threading.Lock()


@contextlib.contextmanager
def _fluent_store():
    """The fluent API (log_model, register_model, models:/ downloads) pointed at this process's store,
    one thread at a time; yields its URI. Both URIs are set: mlflow prefers a registry URI set once to
    the tracking URI. On the way out the process is left as it was, the URIs mlflow keeps (module
    globals, read as mlflow's own _use_tracking_uri does) and the MLFLOW_TRACKING_URI /
    MLFLOW_REGISTRY_URI its setters export: left set, they sent a later MlflowClient of this process, and
    every process started later (a stage, a speedrun), to this store instead of the one they named."""
    with _fluent:
        saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        saved = _tracking_utils._tracking_uri, _registry_utils._registry_uri
        uri = tracking_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(saved[0])  # None exports nothing
            mlflow.set_registry_uri(saved[1])
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _files(step: int) -> list[str]:
    # checkpoint.model_file / meta_file spell these; that module imports torch, which the flow must not.
    return [f"model_{step:06d}.pt", f"meta_{step:06d}.json"]


def _fetch(url: str, local: str) -> None:
    """One file from a path or fsspec URL to a local path: a hard link where it can (same disk), else a copy."""
    if storage.is_local(url):
        src = storage.local_path(url)
        try:
            os.link(src, local)
        except OSError:
            shutil.copyfile(src, local)
    else:
        fs, path = storage.filesystem(url)
        fs.get(path, local)


def stage_files(ckpt_dir: str, step: int, dest: str) -> dict[str, str]:
    """Copy step `step` of a checkpoint and its tokenizer under `dest`; {"checkpoint": dir, "tokenizer": dir}."""
    staged = {"checkpoint": os.path.join(dest, "checkpoint"), "tokenizer": os.path.join(dest, "tokenizer")}
    for d in staged.values():
        os.makedirs(d)
    for name in _files(step):
        _fetch(join(ckpt_dir, name), os.path.join(staged["checkpoint"], name))
    meta = json.loads(storage.read_text(join(ckpt_dir, _files(step)[1])))
    tok_dir = meta.get("tokenizer_dir")
    if not tok_dir or not storage.exists(tok_dir):
        raise FileNotFoundError(f"the tokenizer of {ckpt_dir} ({tok_dir}) is gone; a version needs it to load")
    for name in storage.listdir(tok_dir):
        if name != "result.json" and ".tmp-" not in name:
            _fetch(join(tok_dir, name), os.path.join(staged["tokenizer"], name))
    return staged


def localize(checkpoint: str, tokenizer: str) -> str:
    """Point a downloaded checkpoint's meta at the downloaded tokenizer (load_model reads it from there),
    and at the files the version holds: the model, not the optimizer state its training run also listed
    (a step counts as complete only when every file its meta lists is there)."""
    for name in os.listdir(checkpoint):
        if m := re.fullmatch(r"meta_(\d{6,})\.json", name):
            path = os.path.join(checkpoint, name)
            meta = json.loads(open(path).read())
            meta.setdefault("trained_tokenizer_dir", meta.get("tokenizer_dir"))
            meta["tokenizer_dir"] = os.path.abspath(tokenizer)
            meta["files"] = [f for f in _files(int(m.group(1))) if not f.startswith("meta_")]
            with open(path, "w") as f:
                json.dump(meta, f, indent=2)
    return checkpoint


def _requirements() -> list[str]:
    """What `mlflow models serve` installs: this project and the torch and mlflow it was trained with."""
    pins = []
    for dist in ("nanochat-flow", "torch", "mlflow"):
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def register_checkpoint(run_id: str, ckpt_dir: str, step: int, family: str,
                        tags: dict[str, str] | None = None) -> str:
    """Log step `step` of `ckpt_dir` as the pyfunc model of run `run_id`, register it as a new version of
    `nanochat` and move alias `@<family>` onto it. Returns `models:/nanochat/<version>`."""
    with tempfile.TemporaryDirectory(prefix="nanochat-register-") as tmp, _fluent_store():
        artifacts = stage_files(ckpt_dir, step, tmp)
        # The logged model goes to the fluent API's experiment: the run's, not Default (./mlruns).
        mlflow.set_experiment(experiment_id=client().get_run(run_id).info.experiment_id)
        # Model.log, not pyfunc.log_model: it takes the run id, so no fluent run is opened (and ended)
        # on a child run the flow still owns.
        with _untyped_predict():
            info = mlflow.models.Model.log(
                artifact_path=None, name=ARTIFACT_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                python_model=NanochatModel(), artifacts=artifacts, pip_requirements=_requirements(),
                tags={"family": family, "step": str(step)},
            )
        version = mlflow.register_model(info.model_uri, MODEL_NAME,
                                        tags={"family": family, "step": str(step), "checkpoint": ckpt_dir,
                                              **(tags or {})})
    c = client()
    c.set_registered_model_alias(MODEL_NAME, family, version.version)
    return f"models:/{MODEL_NAME}/{version.version}"


def record_chatcore(model_uri: str, chatcore: float) -> bool:
    """Tag the version behind `model_uri` with its ChatCORE; move @champion onto it if it is the best so
    far (a tie keeps the older champion). True if it became the champion."""
    c = client()
    version = _version(model_uri)
    c.set_model_version_tag(MODEL_NAME, version, "chatcore", str(chatcore))
    with _fluent:  # two evaluations finishing at once must not both read the old champion
        try:
            best = c.get_model_version_by_alias(MODEL_NAME, CHAMPION)
        except mlflow.exceptions.MlflowException:
            best = None
        held = float(best.tags.get("chatcore", "-inf")) if best is not None else None
        if held is not None and held >= chatcore and str(best.version) != str(version):
            return False
        c.set_registered_model_alias(MODEL_NAME, CHAMPION, version)
    return True


def _version(model_uri: str) -> str:
    """`models:/nanochat/3` -> "3"; `models:/nanochat@sft` -> the version the alias points at."""
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client().get_model_version_by_alias(name, alias).version
    return rest.rsplit("/", 1)[1]


def resolve_model_uri(uri: str, dst: str | None = None) -> str:
    """`models:/nanochat@sft` (or /3, /latest) -> a local checkpoint directory `checkpoint.load_model` reads.

    MLflow resolves the URI and downloads the version (to `dst`, else a fresh temp dir); the copy's meta
    then points at the copy's tokenizer."""
    dst = dst or tempfile.mkdtemp(prefix="nanochat-model-")
    # A models:/ URI is resolved through the fluent registry URI, which download_artifacts' tracking_uri
    # argument does not set: left unset, MLflow looked in (and created) ./mlflow.db in the current
    # directory and found no model. The registry is where the pipeline registered: its store.
    with _fluent_store() as store:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=store)
    checkpoint, tokenizer = os.path.join(local, "artifacts", "checkpoint"), os.path.join(local, "artifacts", "tokenizer")
    if not os.path.isdir(checkpoint):  # a version registered before models carried their files
        return local
    return localize(checkpoint, tokenizer)


@contextlib.contextmanager
def _untyped_predict():
    """MLflow warns, defining and saving a PythonModel, that predict has no type hints; a hint would make
    it coerce the input to one shape, and predict takes a conversation or a list of them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method", category=UserWarning)
        yield


with _untyped_predict():

    class NanochatModel(mlflow.pyfunc.PythonModel):
        """A registered nanochat checkpoint as a pyfunc: conversations in, the assistant's replies out.

        predict({"messages": [{"role": "user", "content": "hi"}]}) -> "Hello..."; a list of such -> a list of
        replies. Like a chat completion request, a conversation may carry max_tokens, temperature, top_k and
        seed (the chat defaults otherwise). Generation is the server's: serve.generation.reply_pieces on the
        project's engine (KV cache, calculator tool); the reply is its text, tool calls left out.
        """

        def load_context(self, context) -> None:
            import torch

            from nanochat_core.checkpoint import load_model
            from nanochat_core.serve.loading import Replica

            ckpt = localize(context.artifacts["checkpoint"], context.artifacts["tokenizer"])
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model, tokenizer, meta = load_model(ckpt, device=device)
            self.replica = Replica(model, tokenizer, device, 0, meta)

        def predict(self, context, model_input, params: dict[str, Any] | None = None):
            from nanochat_core.serve.generation import Finish, SamplingParams, reply_pieces

            conversations, single = _conversations(model_input)
            replies = []
            for conv in conversations:
                settings = {**(params or {}), **conv}
                sampling = SamplingParams(**{k: settings[k] for k in SAMPLING if settings.get(k) is not None})
                pieces = reply_pieces(self.replica, list(conv["messages"]), sampling)
                replies.append("".join(p.text for p in pieces if not isinstance(p, Finish) and p.kind == "text"))
            return replies[0] if single else replies


SAMPLING = ("max_tokens", "temperature", "top_k", "seed")


def _conversations(model_input) -> tuple[list[dict], bool]:
    """(conversations, whether one came alone) from a dict, a list of dicts, or a DataFrame with a
    `messages` column (what `mlflow models serve` hands over for JSON records)."""
    if isinstance(model_input, dict):
        return [model_input], True
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        return model_input.to_dict(orient="records"), False
    return list(model_input), False
