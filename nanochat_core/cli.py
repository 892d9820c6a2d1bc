"""`nanochat`: the front door. One subcommand per stage and tool, imported only when called,
so `nanochat plan` never pays for Prefect and the library stays Prefect-free (STYLE.md)."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with a `main(argv)`, one line of help). Two-word commands use a space.
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("nanochat_core.plan", "print the derived training plan and its cost"),
    "corpus build": ("nanochat_core.stages.corpus", "build the sample pretraining corpus from packaged text"),
    "download": ("nanochat_core.stages.download", "fetch pretraining shards + the val shard into base_data"),
    "tok-train": ("nanochat_core.stages.tok_train", "train the BPE tokenizer (Rust) on the first shards"),
    "tok-eval": ("nanochat_core.stages.tok_eval", "bytes/token of the tokenizer on held-out text vs GPT-2/GPT-4"),
    "base-train": ("nanochat_core.stages.base_train", "pretrain the base model (torchrun for N processes)"),
    "base-eval": ("nanochat_core.stages.base_eval", "bits per byte on train/val shards and samples of a base model"),
    "eval-bundle build": ("nanochat_core.stages.eval_bundle", "build or download the CORE eval bundle"),
    "mid-train": ("nanochat_core.stages.mid_train", "midtrain: chat format, multiple choice, tool use, spelling"),
    "sft": ("nanochat_core.stages.chat_sft", "supervised fine-tuning, loss on assistant tokens only"),
    "rl": ("nanochat_core.stages.chat_rl", "reinforcement learning on math word problems (pass@k logged)"),
    "chat-eval": ("nanochat_core.stages.chat_eval", "ARC, MMLU, GSM8K, HumanEval, SpellingBee and ChatCORE"),
    "report": ("nanochat_core.stages.report", "write the report card from every stage's result"),
    "chat": ("nanochat_core.serve.cli", "streaming terminal chat with a trained checkpoint"),
    "serve": ("nanochat_core.serve.server", "web chat UI + OpenAI-compatible API (FastAPI) on a checkpoint"),
    # The only command that imports Prefect, and only when called.
    "speedrun": ("flows.speedrun", "run the whole pipeline as the `nanochat` Prefect flow"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: nanochat COMMAND [flags]   (nanochat COMMAND --help for its flags)\n\ncommands:\n{rows}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    # Longest match first, so "corpus build" wins over a hypothetical "corpus".
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            module = importlib.import_module(COMMANDS[name][0])
            return module.main(argv[words:])
    print(f"error: unknown command {' '.join(argv[:1])!r}; run `nanochat --help` for the list", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
