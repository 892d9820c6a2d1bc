"""The `nanochat` flow: speedrun.sh as a DAG of cached, retried stages.

    nanochat speedrun --preset tiny                      # this machine, embedded defaults
    prefect deployment run nanochat/speedrun             # on the configured work pools

    corpus* ─> download ─┬─> tok_train ─┬─> tok_eval
                         │              │
                         └──────────────┴─> base_train ─┬─> base_eval <── eval_bundle
                                                        └─> mid_train ─> chat_sft ─> chat_rl
                                         chat_eval[mid], chat_eval[sft], chat_eval[rl] ─> report
    (* when the shards come from the sample corpus or your files, corpus.sources; report gathers every stage's ref)
"""

from __future__ import annotations

import math
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from flows import recovery
from flows.tasks import claim_node_devices, claim_result_storage, settings, stage_task
from nanochat_core import hardware, launch, tracking
from nanochat_core.config import SAMPLE_SOURCE, PipelineConfig, flatten
from nanochat_core.errors import UserError
from nanochat_core.presets import PresetConfig
from nanochat_core.registry import STAGES, stage_named
from nanochat_core.stage_args import refuse_gpu_preset_on_cpu

SKIPPABLE = sorted(s.name for s in STAGES.values() if s.skippable)


def stage_list(words: list[str], purpose: str) -> list[str]:
    """The stages `--skip`/`--refresh` name, checked before anything runs: an unknown name would otherwise
    be ignored without a word, and a stage later stages need cannot be skipped."""
    try:
        stages = [stage_named(w, purpose) for w in words]
    except ValueError as e:
        raise UserError(str(e)) from None
    bad = sorted(set(stages) - set(SKIPPABLE)) if purpose == "skip" else []
    if bad:
        raise UserError(f"cannot skip {', '.join(bad)}: later stages need its output; skippable: {', '.join(SKIPPABLE)}")
    return stages


@flow(name="nanochat", log_prints=True)
def nanochat(cfg: PresetConfig = PipelineConfig(), skip: list[str] = [], refresh: list[str] = []) -> dict[str, Any]:
    """Run the pipeline for `cfg`; `skip` leaves stages out, `refresh` re-runs stages despite their cache."""
    skip, refresh = stage_list(skip, "skip"), stage_list(refresh, "refresh")
    # A deployment run (the UI, prefect.yaml) reaches here without the speedrun command's check.
    refuse_gpu_preset_on_cpu(cfg, [s for s in STAGES if STAGES[s].devices == "node" and s not in skip],
                             "cfg.<stage>.device_type = cpu for each torch stage")
    logger = get_run_logger()
    ctx = FlowRunContext.get()
    # Recovery (flows/recovery.py) is for deployment runs, which a pool can run again; past the
    # deployment's bound, or cancelled by a person, the run ends here.
    recoverable = ctx.flow_run.deployment_id is not None
    attempt, stop = recovery.begin_attempt(ctx.flow_run.id) if recoverable else (1, None)
    if stop is not None:
        logger.error(stop.message)
        return stop
    if attempt > 1:
        logger.info(f"attempt {attempt} of at most {recovery.max_attempts()}: finished stages are Cached, "
                    "training continues from its latest checkpoint")
    started = time.time()
    parent = tracking.start_pipeline_run(f"{cfg.preset}-{ctx.flow_run.name}", flatten(cfg),
                                         {"preset": cfg.preset}, flow_run_id=str(ctx.flow_run.id))
    devices = claim_node_devices()
    if block := claim_result_storage():
        logger.info(f"stage results and cache records: result storage block {block} (under the base dir)")
    logger.info(f"torch stages take turns on this node's devices (concurrency limit 1 on tag {devices})")

    def submit(stage: str, inputs: dict, c: PipelineConfig | None = None, name: str | None = None, retries: int = 0,
               after: list | None = None):
        """Submit `stage` (None if skipped) with `c`, else the run's config as it stands (the user's files'
        corpus sets download's shards); inputs that were skipped are left out of its inputs."""
        if stage in skip:
            return None
        c = c or cfg
        t = stage_task(stage, retries).with_options(task_run_name=name or stage, refresh_cache=stage in refresh)
        return t.submit(stage, settings(c, stage), {k: v for k, v in inputs.items() if v is not None}, c, parent,
                        wait_for=after)

    refs: dict[str, Any] = {}
    try:
        # The sample corpus (embedded default) or the user's files (cfg.corpus.sources) are built first;
        # download then reads the corpus like any source, all of its shards when they are the user's.
        corpus = submit("corpus", {}) if cfg.download.url_template == SAMPLE_SOURCE or cfg.corpus.sources else None
        if cfg.corpus.sources and corpus is not None:
            cfg = _with(_with(cfg, "download", url_template=SAMPLE_SOURCE, num_shards=corpus.result()["num_shards"] - 1),
                        "plan", chars_per_shard=float(cfg.corpus.shard_chars))
        # Shards the tokenizer trains on come first; the rest keep downloading while it trains
        # (speedrun.sh's `&`): d20 trains on ceil(2e9 / 250e6) = 8 of its 240 shards.
        shard_chars = cfg.corpus.shard_chars if corpus else cfg.plan.chars_per_shard
        head = min(cfg.download.num_shards, math.ceil(cfg.tok_train.max_chars / shard_chars))
        logger.info(f"tokenizer: {cfg.tok_train.max_chars:,} chars from the first {head} shards of "
                    f"~{shard_chars:,.0f} chars; {cfg.download.num_shards} shards download meanwhile")
        first = submit("download", {"corpus": corpus}, _with(cfg, "download", num_shards=head), name=f"download[:{head}]")
        shards = submit("download", {"corpus": corpus}, after=[first]) if cfg.download.num_shards > head else first
        # tok_train reads exactly the shards `first` lists, so it never sees what `shards` is still fetching.
        tokenizer = submit("tok_train", {"shards": first})
        tok_eval = submit("tok_eval", {"tokenizer": tokenizer, "shards": first})
        model = submit("base_train", {"tokenizer": tokenizer, "shards": shards}, retries=1)
        bundle = submit("eval_bundle", {}) if "base_eval" not in skip else None
        # With the bundle, base_eval scores CORE too, so the report always has it.
        base_eval = submit("base_eval", {"model": model, "tokenizer": tokenizer, "shards": shards, "eval_bundle": bundle},
                           _with(cfg, "base_eval", core=bundle is not None))
        mid = submit("mid_train", {"model": model})
        sft = submit("chat_sft", {"model": mid})
        rl = submit("chat_rl", {"model": sft})
        evals = {f"{family}_eval": submit("chat_eval", {"model": trained}, _with(cfg, "chat_eval", source=family),
                                          name=f"chat_eval[{family}]")
                 for family, trained in (("mid", mid), ("sft", sft), ("rl", rl)) if trained is not None}
        futures = {"corpus": corpus, "download": shards, "tok_train": tokenizer, "tok_eval": tok_eval,
                   "base_train": model, "eval_bundle": bundle, "base_eval": base_eval, "mid_train": mid,
                   "chat_sft": sft, "chat_rl": rl, **evals}
        refs.update({name: f.result() for name, f in futures.items() if f is not None})
        report = submit("report", dict(refs))
        if report is not None:
            refs["report"] = report.result()
            _publish_report(parent, refs["report"])
        # The first download is a task run of its own (download[:N]) but no ref of the report's.
        head_ref = {f"download[:{head}]": first.result()} if first is not None and first is not shards else {}
        _track_cached(parent, {**refs, **head_ref})
        tracking.log_headline(parent, tracking.headline_metrics(
            refs, time.time() - started, cfg.plan.usd_per_gpu_hour, max(1, hardware.node_devices())))
    except BaseException as error:
        # A cancelled or interrupted run (Prefect's SIGTERM, Ctrl-C) lands here first: stop every stage
        # process now, so none keeps the devices after the run ends; a torch stage gets launch.stop_all's
        # grace to write a checkpoint on notice first.
        if recoverable and not isinstance(error, Exception):
            logger.warning("cancelled by a person: stopping the stages; the run will not be recovered"
                           if recovery.interrupted_by_a_person(ctx.flow_run.id) else
                           "interrupted (preemption notice?): stopping the stages, which checkpoint if they can; "
                           "the run goes back to the pool")
        launch.stop_all()
        tracking.end_run(parent, "FAILED")
        if recoverable and isinstance(error, Exception):
            # A failed stage ends the attempt Crashed while attempts are left (the automation runs it
            # again), else Failed with one line naming every attempt.
            state = recovery.after_failure(ctx.flow_run.id, attempt, error, started)
            logger.error(state.message)
            return state
        raise
    tracking.end_run(parent)
    return {"mlflow_run_id": parent, "refs": refs}


def _with(cfg: PipelineConfig, stage: str, **fields) -> PipelineConfig:
    return cfg.model_copy(update={stage: getattr(cfg, stage).model_copy(update=fields)})


def _track_cached(parent_run_id: str, refs: dict[str, dict | None]) -> None:
    """Every stage this run took from the cache gets a child run here too (tagged cached=true, its
    figures copied, `source_run_id` naming the run that produced it), so each parent is complete."""
    for name, ref in refs.items():
        if ref is not None and ref.get("parent_run_id") != parent_run_id:
            family = tracking.eval_family(name)
            if family:  # mid_eval is the task run chat_eval[mid]
                stage, name = "chat_eval", f"chat_eval[{family}]"
            else:
                stage = name.split("[")[0]
            tracking.record_cached_stage(parent_run_id, stage, ref, name)


def _publish_report(parent_run_id: str, ref: dict) -> None:
    """The report card as a Prefect markdown artifact, and report.md with its plots on the MLflow parent
    run (from wherever the base dir is: a remote one is fetched through the storage layer first)."""
    from nanochat_core import storage

    markdown = storage.read_text(ref["path"].rstrip("/") + "/report.md")
    create_markdown_artifact(markdown=markdown, key="nanochat-report", description="nanochat report card")
    tracking.log_dir(parent_run_id, ref["path"], "report")
    get_run_logger().info(f"report: {ref['path']}/report.md")
