"""A conversation in, the assistant's reply out as a stream of pieces: where serving meets the model.

    job = chat_job(tokenizer, messages, SamplingParams(max_tokens=64), context_len)   # the server: pool.stream(job)
    for piece in reply_pieces(replica, messages, SamplingParams(max_tokens=64)):       # alone: `nanochat chat`
        ...  # Piece(text, kind) many times, then one Finish(reason, prompt_tokens, completion_tokens, ...)

A `Job` is what a replica's batch runs: prompt ids, sampling settings, and an output object that turns
the sampled tokens into what the client receives (`ChatOutput` here, `completion.CompletionOutput`).

Three things here are serving's job, not the engine's:
- the prompt fits the context window: whole turns are dropped from the oldest end (nanochat's chat
  CLI crashed once history outgrew the context, issue #581); a last user message longer than the window
  keeps its end;
- text is streamed UTF-8 safe: token bytes go through an incremental decoder, so a character split
  across tokens is emitted only once complete (never half of it, never a stray U+FFFD); a reply cut by
  max_tokens inside a character ends in one U+FFFD, on every path alike (tests/test_serve_chinese.py);
- `stop` strings end the reply, and text that may be the start of one is held back until it is not.
"""

from __future__ import annotations

import codecs
import threading
from dataclasses import dataclass, field, replace
from typing import Iterator, Protocol

from nanochat_core.chat_format import ConversationError, messages_of, render_conversation

# Tokens that end a reply (nanochat's engine stops on these two); any other turn marker means the model
# wandered into writing the user's turn, which also ends the reply.
END_TOKENS = ("<|assistant_end|>", "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>")
KIND_SWITCH = {"<|python_start|>": "python", "<|python_end|>": "text",
               "<|output_start|>": "python_output", "<|output_end|>": "text"}


@dataclass
class SamplingParams:
    temperature: float = 0.6
    top_k: int | None = 50
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Piece:
    """Reply text of one kind: `text`, `python` (a tool call) or `python_output` (the tool's result)."""

    text: str
    kind: str = "text"


@dataclass
class Finish:
    reason: str  # "stop" (end token or stop string), "length" (token budget), "cancelled"
    prompt_tokens: int
    completion_tokens: int
    dropped_messages: int = 0  # oldest messages trimmed to fit the context window


def fit_prompt(tokenizer, messages: list[dict], context_len: int, max_tokens: int) -> tuple[list[int], int, int]:
    """(prompt ids, new-token budget, messages dropped) for a conversation ending in a user turn.

    Room is kept for min(max_tokens, context/2) new tokens; history beyond that goes, oldest first,
    in user+assistant pairs so the roles keep alternating.
    """
    messages = messages_of({"messages": messages})
    if messages[-1]["role"] != "user":
        raise ConversationError("the last message must be from the user; the model answers it")
    reserve = max(1, min(max_tokens, context_len // 2))
    assistant_start = tokenizer.encode_special("<|assistant_start|>")
    dropped = 0
    while True:
        ids, _ = render_conversation(tokenizer, {"messages": messages}, max_tokens=1 << 62)
        ids.append(assistant_start)
        if len(ids) + reserve <= context_len or len(messages) == 1:
            break
        messages = messages[2:]
        dropped += 2
    if len(ids) + reserve > context_len:  # one user message longer than the window: keep its end
        special = tokenizer.encode_special
        body = tokenizer.encode(messages[0]["content"])
        keep = max(0, context_len - reserve - 4)
        ids = [tokenizer.bos_token_id, special("<|user_start|>"), *body[len(body) - keep:],
               special("<|user_end|>"), assistant_start]
    return ids, max(1, min(max_tokens, context_len - len(ids))), dropped


class Output(Protocol):
    """Turns one sequence's tokens into what its client receives; runs on the replica's thread."""

    def start(self, prompt_logprobs: list | None) -> list: ...  # after the prefill (the echoed prompt)
    def feed(self, token: int, logprob: float | None, top: list | None) -> tuple[list, bool]: ...  # True: stop
    def close(self, cancelled: bool = False) -> list: ...  # the last items, ending with a Finish


@dataclass
class Job:
    """One sequence for a replica's batch: the prompt, how to sample it, and the `output` that turns its
    tokens into what the client receives (`ChatOutput` here, `completion.CompletionOutput`)."""

    prompt: list[int]
    params: SamplingParams  # max_tokens is the budget, already fitted to the context window
    output: Output
    tools: bool = True  # the calculator runs on python blocks (chat); off for raw text completion
    logprobs: int | None = None  # alternatives to report per generated token (None: no logprobs)
    prompt_logprobs: int | None = None  # the same for every prompt position (`echo` with logprobs)


def chat_job(tokenizer, messages: list[dict], params: SamplingParams, context_len: int) -> Job:
    """The job for a chat reply: the conversation fitted to the window, the reply streamed as pieces."""
    prompt, budget, dropped = fit_prompt(tokenizer, messages, context_len, params.max_tokens)
    return Job(prompt, replace(params, max_tokens=budget), ChatOutput(tokenizer, params.stop, len(prompt), dropped))


def token_stream(replica, prompt: list[int], params: SamplingParams) -> Iterator[int]:
    """Sampled ids after `prompt` from the engine (KV cache, calculator tool); tool output arrives as
    forced `<|output_start|>…<|output_end|>` tokens in the same stream."""
    seed = params.seed if params.seed is not None else 42
    for column, _ in replica.engine.generate(prompt, 1, max_tokens=params.max_tokens,
                                             temperature=params.temperature, top_k=params.top_k or None,
                                             seed=seed):
        yield column[0]


class _Output:
    """Token bytes -> pieces: UTF-8 safe decoding, the current part kind, stop strings on text."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.kind = "text"
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""  # text that may be the start of a stop string

    def feed(self, data: bytes) -> tuple[list[Piece], bool]:
        return self._text(self.decoder.decode(data))

    def flush(self) -> tuple[list[Piece], bool]:
        """End of a part: the decoder's incomplete tail (as U+FFFD) and any held text come out."""
        pieces, hit = self._text(self.decoder.decode(b"", final=True))
        self.decoder.reset()
        if not hit and self.held:
            pieces.append(Piece(self.held, self.kind))
        self.held = ""
        return pieces, hit

    def _text(self, text: str) -> tuple[list[Piece], bool]:
        if self.kind != "text" or not self.stops:
            return ([Piece(text, self.kind)] if text else []), False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return ([Piece(buf[: min(hits)])] if min(hits) else []), True
        hold = 0
        for s in self.stops:  # longest suffix of buf that begins some stop string
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self.held = buf[len(buf) - hold:]
        out = buf[: len(buf) - hold]
        return ([Piece(out)] if out else []), False


class ChatOutput:
    """A reply's tokens -> Piece(text, kind)s and one Finish: end tokens, part kinds, stop strings."""

    def __init__(self, tokenizer, stops: list[str], prompt_tokens: int, dropped: int = 0):
        self.tokenizer, self.prompt_tokens, self.dropped = tokenizer, prompt_tokens, dropped
        self.specials = {tokenizer.encode_special(name): name for name in (*END_TOKENS, *KIND_SWITCH)}
        self.out = _Output(stops)
        self.generated, self.reason = 0, "length"

    def start(self, prompt_logprobs=None) -> list:
        return []

    def feed(self, token: int, logprob: float | None = None, top=None) -> tuple[list[Piece], bool]:
        self.generated += 1
        name = self.specials.get(token)
        if name is None:
            pieces, hit = self.out.feed(self.tokenizer.enc.decode_single_token_bytes(token))
        else:
            pieces, hit = self.out.flush()
            if name in KIND_SWITCH:
                self.out.kind = KIND_SWITCH[name]
        if hit or name in END_TOKENS:
            self.reason = "stop"
        return pieces, self.reason == "stop"

    def close(self, cancelled: bool = False) -> list[Piece | Finish]:
        """The last pieces and the Finish: held text is reply text when the budget ran out."""
        reason = "cancelled" if cancelled else self.reason
        pieces = self.out.flush()[0] if reason == "length" else []
        return [*pieces, Finish(reason, self.prompt_tokens, self.generated, self.dropped)]


def reply_pieces(replica, messages: list[dict], params: SamplingParams,
                 cancel: threading.Event | None = None) -> Iterator[Piece | Finish]:
    """Stream the reply to `messages` (OpenAI-style dicts, last one from the user) on one replica alone,
    without batching (`nanochat chat`; the reference the batched server is tested against)."""
    job = chat_job(replica.tokenizer, messages, params, replica.context_len)
    for token in token_stream(replica, job.prompt, job.params):
        if cancel is not None and cancel.is_set():
            yield from job.output.close(cancelled=True)
            return
        pieces, done = job.output.feed(token)
        yield from pieces
        if done:
            break
    yield from job.output.close()
