"""The `nanochat` flow: speedrun.sh as a DAG of cached, retried stages.

    nanochat speedrun --preset tiny                      # this machine, embedded defaults
    prefect deployment run nanochat/speedrun             # on the configured work pools

    corpus* ─> download ─┬─> tok_train ─┬─> tok_eval
                         │              │
                         └──────────────┴─> base_train ─┬─> base_eval <── eval_bundle
                                                        └─> mid_train ─> chat_sft ─> chat_rl
                                         chat_eval[mid], chat_eval[sft], chat_eval[rl] ─> report
    (* only when the shards come from the sample corpus; report gathers every stage's ref)
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from flows.tasks import settings, stage_task
from nanochat_core import tracking
from nanochat_core.config import SAMPLE_SOURCE, PipelineConfig, flatten
from nanochat_core.errors import UserError
from nanochat_core.registry import STAGES

# Shards the tokenizer trains on come first; the rest keep downloading while it trains (speedrun.sh's `&`).
TOKENIZER_SHARDS = 8
SKIPPABLE = sorted(s.name for s in STAGES.values() if s.skippable)


@flow(name="nanochat", log_prints=True)
def nanochat(cfg: PipelineConfig = PipelineConfig(), skip: list[str] = [], refresh: list[str] = []) -> dict[str, Any]:
    """Run the pipeline for `cfg`; `skip` leaves stages out, `refresh` re-runs stages despite their cache."""
    bad = set(skip) - set(SKIPPABLE)
    if bad:
        raise UserError(f"cannot skip {', '.join(sorted(bad))}: later stages need it; skippable: {', '.join(sorted(SKIPPABLE))}")
    ctx = FlowRunContext.get()
    parent = tracking.start_pipeline_run(
        f"{cfg.preset}-{ctx.flow_run.name}", flatten(cfg),
        {"preset": cfg.preset, "prefect_flow_run_id": str(ctx.flow_run.id)},
    )

    def submit(stage: str, inputs: dict, c: PipelineConfig = cfg, name: str | None = None, retries: int = 0, **kw):
        t = stage_task(stage, retries).with_options(task_run_name=name or stage, refresh_cache=stage in refresh)
        return t.submit(stage, settings(c, stage), inputs, c, parent, **kw)

    refs: dict[str, Any] = {}
    try:
        # The sample corpus (embedded default) is built first; download then reads it like any source.
        source = {"corpus": submit("corpus", {}).result()} if cfg.download.source == SAMPLE_SOURCE else {}
        refs.update(source)
        head = min(cfg.download.num_shards, TOKENIZER_SHARDS)
        first = submit("download", source, _with(cfg, "download", num_shards=head), name=f"download[:{head}]")
        shards = submit("download", source) if cfg.download.num_shards > head else first
        # tok_train reads exactly the shards `first` lists, so it never sees what `shards` is still fetching.
        tokenizer = submit("tok_train", {"shards": first})
        tok_eval = None if "tok_eval" in skip else submit("tok_eval", {"tokenizer": tokenizer, "shards": first})
        train = cfg.base_train
        model = submit("base_train", {"tokenizer": tokenizer, "shards": shards}, retries=1,
                       nproc_per_node=train.nproc_per_node, nnodes=train.nnodes)
        bundle = None if "eval_bundle" in skip or "base_eval" in skip else submit("eval_bundle", {})
        base_eval = None
        if "base_eval" not in skip:
            # With the bundle, base_eval scores CORE too, so the report always has it.
            inputs = {"model": model, "tokenizer": tokenizer, "shards": shards, **({"eval_bundle": bundle} if bundle else {})}
            base_eval = submit("base_eval", inputs,
                               _with(cfg, "base_eval", core=bundle is not None),
                               nproc_per_node=train.nproc_per_node, nnodes=train.nnodes)
        mid = submit("mid_train", {"model": model}, nproc_per_node=cfg.mid_train.nproc_per_node)
        sft = submit("chat_sft", {"model": mid}, nproc_per_node=cfg.chat_sft.nproc_per_node)
        rl = None if "chat_rl" in skip else submit("chat_rl", {"model": sft}, nproc_per_node=cfg.chat_rl.nproc_per_node)
        futures = {"download": shards, "tok_train": tokenizer, "tok_eval": tok_eval, "base_train": model,
                   "eval_bundle": bundle, "base_eval": base_eval, "mid_train": mid, "chat_sft": sft, "chat_rl": rl}
        if "chat_eval" not in skip:
            for source, trained in (("mid", mid), ("sft", sft), ("rl", rl)):
                if trained is not None:
                    futures[f"{source}_eval"] = submit(
                        "chat_eval", {"model": trained}, _with(cfg, "chat_eval", model_source=source),
                        name=f"chat_eval[{source}]", nproc_per_node=cfg.chat_eval.nproc_per_node)
        refs.update({name: f.result() for name, f in futures.items() if f is not None})
        if "report" not in skip:
            refs["report"] = submit("report", dict(refs)).result()
            _publish_report(parent, refs["report"])
    except BaseException:
        tracking.end_run(parent, "FAILED")
        raise
    tracking.end_run(parent)
    return {"mlflow_run_id": parent, "refs": refs}


def _with(cfg: PipelineConfig, stage: str, **fields) -> PipelineConfig:
    return cfg.model_copy(update={stage: getattr(cfg, stage).model_copy(update=fields)})


def _publish_report(parent_run_id: str, ref: dict) -> None:
    """The report card as a Prefect markdown artifact and on the MLflow parent run."""
    from nanochat_core import storage

    markdown = storage.read_text(ref["path"].rstrip("/") + "/report.md")
    create_markdown_artifact(markdown=markdown, key="nanochat-report", description="nanochat report card")
    if "://" not in ref["path"]:
        tracking.log_artifact(parent_run_id, ref["path"], "report")
    get_run_logger().info(f"report: {ref['path']}/report.md")
