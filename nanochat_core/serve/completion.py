"""Text completion (`POST /v1/completions`): a prompt in, its continuation out, with OpenAI's logprobs.

    job = completion_job(tokenizer, "The capital of France is", params, context_len, logprobs=5, echo=True)
    # the pool runs it: job.output gives TextDelta(text, logprobs) pieces, then one Finish

What the model reads is BOS and then the prompt, as every training document began; a prompt that already
starts with BOS gets no second one. A prompt is a string (special-token names in it, `<|user_start|>`
and friends, read as those tokens, so a rendered chat prompt can be sent as text) or token ids. Base,
mid, SFT and RL checkpoints are all served this way; the calculator tool does not run (raw completion).
`<|bos|>` and `<|assistant_end|>` end the text (finish_reason "stop"), as they end the engine's rows.

Logprobs are the model's own distribution, log-softmax of its logits before temperature and top-k, so a
score does not depend on sampling settings. They come in OpenAI's legacy shape:
    {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}, ...], "text_offset": [...]}
`top_logprobs` holds the k most likely tokens and the chosen one when it is not among them (k+1 at most,
as OpenAI's); a token that is not whole UTF-8 on its own is written `bytes:\\xe2\\x80` as OpenAI does;
`text_offset` indexes the returned `text`. With `echo` they cover the prompt as sent (not the BOS added
in front), so lm-evaluation-harness's `token_logprobs[ctxlen:-1]` lands on the continuation; the first
prompt token is scored given that BOS, and is null only when the prompt itself starts with BOS.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, replace

from nanochat_core.errors import UserError
from nanochat_core.serve.generation import Finish, Job, SamplingParams, _Output

STOP_TOKENS = ("<|bos|>", "<|assistant_end|>")  # the engine's stop ids: a document or a reply ends


@dataclass
class TextDelta:
    """Completion text and the logprobs of the tokens behind it (`logprobs` None when not asked)."""

    text: str
    logprobs: dict | None = None


def encode_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    """BOS + the prompt's ids (special-token names in a string read as the tokens)."""
    if isinstance(prompt, str):
        ids = tokenizer.enc.encode(prompt, allowed_special="all")
    else:
        vocab = tokenizer.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise UserError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        ids = list(prompt)
    return ids if ids[:1] == [tokenizer.bos_token_id] else [tokenizer.bos_token_id, *ids]


def completion_job(tokenizer, prompt: str | list[int], params: SamplingParams, context_len: int,
                   logprobs: int | None = None, echo: bool = False) -> Job:
    """The job for one prompt. The budget is cut to what the window leaves (finish_reason "length" says
    so); a prompt that leaves no room is a UserError naming its length and the window."""
    ids = encode_prompt(tokenizer, prompt)
    room = context_len - len(ids)
    if room < (1 if params.max_tokens else 0):
        raise UserError(f"the prompt has {len(ids)} tokens (BOS included) and the model's window is "
                        f"{context_len}; shorten it" + (" or send max_tokens 0" if room == 0 else ""))
    added_bos = not (isinstance(prompt, list) and prompt[:1] == [tokenizer.bos_token_id])
    output = CompletionOutput(tokenizer, params.stop, ids, logprobs, echo, skip=1 if added_bos else 0)
    return Job(ids, replace(params, max_tokens=min(params.max_tokens, room)), output, tools=False,
               logprobs=logprobs, prompt_logprobs=logprobs if echo else None)


def token_string(tokenizer, token: int) -> str:
    """A token as OpenAI writes it in logprobs: its text, or `bytes:\\xNN...` when not whole UTF-8."""
    data = tokenizer.enc.decode_single_token_bytes(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class CompletionOutput:
    """A completion's tokens -> TextDelta pieces (UTF-8 safe, stop strings held back) and one Finish."""

    def __init__(self, tokenizer, stops: list[str], prompt: list[int], logprobs: int | None, echo: bool,
                 skip: int):
        self.tokenizer, self.prompt, self.logprobs, self.echo, self.skip = tokenizer, prompt, logprobs, echo, skip
        self.stop_ids = {tokenizer.encode_special(name) for name in STOP_TOKENS}
        self.out = _Output(stops)
        self.counter = codecs.getincrementaldecoder("utf-8")(errors="replace")  # text_offset bookkeeping
        self.chars = 0
        self.generated, self.reason = 0, "length"

    def start(self, prompt_logprobs=None) -> list[TextDelta]:
        """The echoed prompt (text and, with logprobs, its scores); nothing without `echo`."""
        if not self.echo:
            return []
        tokens = self.prompt[self.skip:]
        scores = (prompt_logprobs or [None] * len(self.prompt))[self.skip:]
        lp = self._entries(tokens, scores) if self.logprobs is not None else None
        text = self.tokenizer.enc.decode_bytes(tokens).decode("utf-8", errors="replace")
        return [TextDelta(text, lp)]

    def feed(self, token: int, logprob: float | None = None, top=None) -> tuple[list[TextDelta], bool]:
        self.generated += 1
        if token in self.stop_ids:  # the end of the document: not part of the text
            self.reason = "stop"
            pieces, _ = self.out.flush()
            return [TextDelta(p.text) for p in pieces], True
        lp = self._entries([token], [(logprob, top)]) if self.logprobs is not None else None
        pieces, hit = self.out.feed(self.tokenizer.enc.decode_single_token_bytes(token))
        text = "".join(p.text for p in pieces)
        if hit:
            self.reason = "stop"
        return ([TextDelta(text, lp)] if text or lp else []), hit

    def close(self, cancelled: bool = False) -> list[TextDelta | Finish]:
        reason = "cancelled" if cancelled else self.reason
        tail = [TextDelta(p.text) for p in self.out.flush()[0]] if reason == "length" else []
        return [*tail, Finish(reason, len(self.prompt), self.generated)]

    def _entries(self, tokens: list[int], scores: list) -> dict:
        """OpenAI's logprobs lists for `tokens`, given (log p, [(id, log p), ...]) or None per token."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, score in zip(tokens, scores):
            name = token_string(self.tokenizer, token)
            out["tokens"].append(name)
            out["text_offset"].append(self.chars)
            self.chars += len(self.counter.decode(self.tokenizer.enc.decode_single_token_bytes(token)))
            if score is None or score[0] is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            logprob, top = score
            alternatives = {token_string(self.tokenizer, t): p for t, p in top}
            alternatives.setdefault(name, logprob)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(alternatives)
        return out
