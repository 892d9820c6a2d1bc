"""The stage registry: one record per DAG node, and every per-stage table derived from it.

    from nanochat_core.registry import STAGES
    STAGES["base_train"].reads          # ('base_train', 'plan', 'preset'): what its cache key covers
    STAGES["mid_train"].inputs          # ('model',): the refs run(cfg, inputs) reads

The flow (what to submit, what may be skipped, what resumes on retry), the task adapter (cache-key
sections, MLflow params, model registration), the CLI (subcommands), the report (stage order, summary
columns), the default paths (paths.output_dir) and the tests all read these records; nothing else
lists stages. Pure data with no imports from the package, so that config-free and torch-free
callers (the flow process, `nanochat --help`) can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# What a stage occupies while it runs. "node": every accelerator of the node (all its CPU cores when the
# node has none): torch stages. "cores": the CPU cores (the Rust trainer, text conversion), which only
# collide with torch stages on a CPU node; "none": light I/O stages. The flow never runs two stages that
# occupy the same devices at once (flows/tasks.device_tags).
Devices = Literal["node", "cores", "none"]


@dataclass(frozen=True)
class Stage:
    name: str  # the DAG node and its module nanochat_core.stages.<name>
    command: str  # `nanochat <command>`
    help: str  # one line for `nanochat --help`
    reads: tuple[str, ...]  # PipelineConfig fields run() reads: exactly what the cache key covers
    out: str  # default output under the base dir; {depth} and {source} filled in by paths.output_dir
    inputs: tuple[str, ...] = ()  # named refs run(cfg, inputs) reads (each may be absent if optional)
    optional: tuple[str, ...] = ()  # of those, the ones the stage can do without
    resumable: bool = False  # checkpoints as it trains; a retry or a new run of the same settings continues
    family: str | None = None  # checkpoint family it writes (base/mid/sft/rl): a model, registered in MLflow
    starts_from: str | None = None  # checkpoint family its `model` input comes from (None: its config says)
    devices: Devices = "none"
    skippable: bool = False  # a run may leave it out (nothing later needs its output)

    @property
    def module(self) -> str:
        return f"nanochat_core.stages.{self.name}"

    @property
    def section(self) -> str:
        """Its own config section (every stage's is named like the stage)."""
        return self.name


# In DAG order: the report and the speedrun summary list stages in this order.
STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("corpus", "corpus build", "build the pretraining corpus from packaged text or your own files (--from)",
          reads=("corpus",), out="sample_corpus", devices="cores"),
    Stage("download", "download", "fetch pretraining shards + the val shard into base_data",
          reads=("download",), out="base_data", inputs=("corpus",), optional=("corpus",)),
    Stage("tok_train", "tok-train", "train the BPE tokenizer (Rust) on the first shards",
          reads=("tok_train",), out="tokenizer", inputs=("shards",), devices="cores"),
    Stage("tok_eval", "tok-eval", "bytes/token of the tokenizer on held-out text vs GPT-2/GPT-4",
          reads=("tok_eval",), out="tok_eval", inputs=("tokenizer", "shards"), devices="cores", skippable=True),
    Stage("base_train", "base-train", "pretrain the base model (torchrun for N processes)",
          reads=("base_train", "plan", "preset"), out="base_checkpoints/d{depth}", inputs=("tokenizer", "shards"),
          resumable=True, family="base", devices="node"),
    Stage("eval_bundle", "eval-bundle build", "build or download the CORE eval bundle",
          reads=("eval_bundle",), out="eval_bundle", devices="cores", skippable=True),
    Stage("base_eval", "base-eval", "bits per byte on train/val shards, samples and CORE of a base model",
          reads=("base_eval", "core"), out="base_eval/d{depth}", inputs=("model", "tokenizer", "shards", "eval_bundle"),
          optional=("eval_bundle",), starts_from="base", devices="node", skippable=True),
    Stage("mid_train", "mid-train", "midtrain: chat format, multiple choice, tool use, spelling",
          reads=("mid_train", "plan", "preset"), out="mid_checkpoints/d{depth}", inputs=("model",),
          resumable=True, family="mid", starts_from="base", devices="node"),
    Stage("chat_sft", "sft", "supervised fine-tuning, loss on assistant tokens only",
          reads=("chat_sft", "plan", "preset"), out="chatsft_checkpoints/d{depth}", inputs=("model",),
          resumable=True, family="sft", starts_from="mid", devices="node"),
    Stage("chat_rl", "rl", "reinforcement learning on math word problems (pass@k logged)",
          reads=("chat_rl", "preset"), out="chatrl_checkpoints/d{depth}", inputs=("model",),
          family="rl", starts_from="sft", devices="node", skippable=True),
    # One run per trained family (chat_eval[mid], [sft], [rl]); its config's `source` names which.
    Stage("chat_eval", "chat-eval", "ARC, MMLU, GSM8K, HumanEval, SpellingBee and ChatCORE",
          reads=("chat_eval",), out="chat_eval/{source}", inputs=("model",), devices="node", skippable=True),
    # Gathers every other stage's ref; run by hand it finds their result.json files under the base dir.
    Stage("report", "report", "write the report card from every stage's result",
          reads=("preset",), out="report", skippable=True),
]}

# Checkpoint family -> the stage that writes it (base -> base_train, ...), in training order.
FAMILIES: dict[str, Stage] = {s.family: s for s in STAGES.values() if s.family}


def family_dir(family: str) -> str:
    """The directory of a checkpoint family under the base dir: nanochat's names (chatsft_checkpoints...)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown checkpoint family {family!r}; families are {', '.join(FAMILIES)}")
    return FAMILIES[family].out.split("/")[0]


def eval_ref_name(family: str) -> str:
    """The name an evaluation of a family's model goes by in the refs and the report: base_eval, mid_eval ..."""
    return f"{family}_eval"


def stage_named(word: str, purpose: str) -> str:
    """The stage a user means by `word`: its name (chat_rl), its command (rl, base-train) or the name with
    hyphens (base-train); anything else is a ValueError naming the valid stages. `purpose` ("skip",
    "refresh") says in the message which flag got the word."""
    for stage in STAGES.values():
        if word in (stage.name, stage.command, stage.name.replace("_", "-")):
            return stage.name
    raise ValueError(f"--{purpose} {word!r}: no such stage; stages are {', '.join(STAGES)}")
