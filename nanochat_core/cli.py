"""`nanochat`: the front door. One subcommand per stage and tool, imported only when called,
so `nanochat plan` never pays for Prefect and the library stays Prefect-free (STYLE.md)."""

from __future__ import annotations

import importlib
import sys

from nanochat_core.registry import STAGES

# subcommand -> (module with a `main(argv)`, one line of help). Two-word commands use a space.
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("nanochat_core.plan", "print the derived training plan and its cost"),
    **{s.command: (s.module, s.help) for s in STAGES.values()},
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
