"""`nanochat chat`: streaming terminal chat with a trained checkpoint.

    nanochat chat                                   # the most post-trained model in the base dir
    nanochat chat --source sft --temperature 0.6 --top-k 50
    nanochat chat --checkpoint models:/nanochat/3 -p "What is 12*7?"     # one question, then exit

In the session: /clear starts over, /quit (or Ctrl-D) leaves, Ctrl-C stops a reply mid-way.
History that no longer fits the context window is dropped from the oldest turns, never a crash.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import TextIO

from nanochat_core.config import ServingConfig
from nanochat_core.flags import config_from_args, stage_parser
from nanochat_core.errors import exit_on_user_error
from nanochat_core.serve.generation import Finish, SamplingParams, reply_pieces

TOOL_OPEN, TOOL_ARROW, TOOL_CLOSE = "<<", "=", ">>"


def reply(replica, history: list[dict], cfg: ServingConfig, out: TextIO) -> tuple[str, Finish]:
    """Stream one assistant reply to `out`; returns (its text as the model saw it, the finish)."""
    inf = cfg.inference
    params = SamplingParams(temperature=inf.temperature, top_k=inf.top_k, max_tokens=inf.max_tokens,
                            seed=secrets.randbits(31))
    text, kind, finish = [], "text", None
    for item in reply_pieces(replica, history, params):
        if isinstance(item, Finish):
            finish = item
            break
        mark = {("text", "python"): TOOL_OPEN, ("python", "python_output"): TOOL_ARROW,
                ("python_output", "text"): TOOL_CLOSE, ("python", "text"): TOOL_CLOSE}.get((kind, item.kind), "")
        kind = item.kind
        text.append(mark + item.text)
        out.write(mark + item.text)
        out.flush()
    if kind != "text":
        text.append(TOOL_CLOSE)
        out.write(TOOL_CLOSE)
    out.write("\n")
    out.flush()
    return "".join(text), finish


def session(replica, cfg: ServingConfig, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """The interactive loop; reads lines from `inp` so tests can drive it."""
    history: list[dict] = []
    out.write(f"nanochat ({replica.meta.get('label')}, context {replica.context_len} tokens). "
              "/clear starts over, /quit leaves.\n")
    while True:
        out.write("\nUser: ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input (Ctrl-D)
            out.write("\n")
            return
        line = line.rstrip("\n")
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/clear":
            history = []
            out.write("(conversation cleared)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        out.write("\nAssistant: ")
        try:
            text, finish = reply(replica, history, cfg, out)
        except KeyboardInterrupt:
            out.write("\n(stopped)\n")
            history.pop()
            continue
        if finish.dropped_messages:
            # keep memory bounded too: what the model can no longer see is gone from the history
            history = history[finish.dropped_messages:]
            out.write(f"(the {finish.dropped_messages} oldest messages no longer fit the context and were left out)\n")
        history.append({"role": "assistant", "content": text})


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("nanochat chat", "Chat with a trained model in the terminal.",
                          {"inference": None, "chat": None}, ServingConfig)
    parser.add_argument("-p", dest="chat.prompt", metavar="PROMPT", default=argparse.SUPPRESS,
                        help="same as --prompt: ask one question, print the reply and exit")
    cfg = config_from_args(parser.parse_args(argv), ServingConfig)
    from nanochat_core.serve.loading import load_replicas

    replica = load_replicas(cfg.inference, 1)[0]
    if cfg.chat.prompt is not None:
        reply(replica, [{"role": "user", "content": cfg.chat.prompt}], cfg, sys.stdout)
        return
    try:
        session(replica, cfg)
    except KeyboardInterrupt:  # Ctrl-C at the prompt leaves quietly
        print()


if __name__ == "__main__":
    main()
