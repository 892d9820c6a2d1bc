"""Request shapes of the chat and completion endpoints, their input limits, and OpenAI's error shape.

Limits are nanochat's chat_web limits (NANOCHAT_FACTS.md): at most 500 messages, 8,000 characters
per message and 32,000 in total, temperature 0-2, top-k 0-200, max tokens 1-4,096. A request outside
them is a 400 in OpenAI's error shape, so clients that handle OpenAI errors handle ours.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 200
MAX_NEW_TOKENS = 4_096
MAX_STOP_SEQUENCES = 4
MAX_LOGPROBS = 20  # alternatives per position in /v1/completions (vLLM's default cap; OpenAI's is 5)
MAX_PROMPTS = 128  # prompts in one /v1/completions request (a harness batches many short ones)
MAX_BODY_BYTES = 1 << 20  # 32,000 characters are at most 128 KB of UTF-8; JSON overhead fits easily


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _check_top_p(v: float | None) -> float | None:
    # The engine samples with temperature and top-k only; 1.0 (what clients send by default) is a no-op.
    if v is not None and v < 1:
        raise ValueError("nucleus sampling is not supported by this model's engine; send top_p 1 "
                         "(or none) and limit with top_k instead")
    return v


def _stop_list(v: str | list[str] | None) -> list[str] | None:
    if v is None:
        return None
    stops = [v] if isinstance(v, str) else v
    if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
        raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings")
    return stops


class ContentPart(BaseModel):
    """OpenAI's list form of message content; only text parts mean anything to this model."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send `name` and friends
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise ValueError(f"content part type {bad[0]!r} is not supported; this model reads text parts only")
        return "".join(p.text or "" for p in self.content)


class ChatRequest(BaseModel):
    """Fields both endpoints accept. The native `/chat/completions` uses this directly."""

    model_config = ConfigDict(extra="ignore")
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = None

    _top_p = field_validator("top_p")(classmethod(lambda cls, v: _check_top_p(v)))
    _stop = field_validator("stop")(classmethod(lambda cls, v: _stop_list(v)))

    @model_validator(mode="after")
    def _limits(self) -> "ChatRequest":
        total = 0
        for i, m in enumerate(self.messages):
            try:
                n = len(m.text())
            except ValueError as e:
                raise ValueError(f"messages[{i}]: {e}") from None
            if n > MAX_MESSAGE_CHARS:
                raise ValueError(
                    f"messages[{i}] has {n} characters; the limit is {MAX_MESSAGE_CHARS} per message"
                )
            total += n
        if total > MAX_TOTAL_CHARS:
            raise ValueError(f"the messages have {total} characters in total; the limit is {MAX_TOTAL_CHARS}")
        return self

    def conversation(self) -> list[dict[str, str]]:
        """Messages in the chat format's shape: system/developer first merged by chat_format,
        consecutive turns of one role joined (OpenAI allows them, the format alternates)."""
        out: list[dict[str, str]] = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            if role == "system" and out:
                role = "user"  # a late system message is an instruction from the user's side
            if out and out[-1]["role"] == role:
                out[-1]["content"] += "\n\n" + m.text()
            else:
                out.append({"role": role, "content": m.text()})
        return out


class Unsupported(BaseModel):
    """OpenAI fields this server does not implement. Accepting and dropping them would give a client that
    relies on them a wrong answer; the neutral values clients send by default (penalty 0, `logit_bias: {}`,
    `tools: []`, `response_format: {"type": "text"}`) pass, anything else is a 400 naming the field."""

    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("tools", "functions")
    @classmethod
    def _tools(cls, v):
        if v:
            raise ValueError("function/tool calling is not supported by this model (its one tool, the "
                             "calculator, runs inside the reply); send no tools")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _tool_choice(cls, v):
        if v not in (None, "none", "auto"):
            raise ValueError("function/tool calling is not supported by this model; send none or omit it")
        return v

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v):
        if v is not None and v.get("type", "text") != "text":
            raise ValueError(f"{v.get('type')!r} output is not supported (nothing constrains this model's "
                             "output to JSON); send {\"type\": \"text\"} or omit it")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v):
        if v:
            raise ValueError("repetition penalties are not supported by this model's engine; send 0 or omit it")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v:
            raise ValueError("biasing tokens is not supported by this model's engine; send {} or omit it")
        return v


class OpenAIChatRequest(ChatRequest, Unsupported):
    """`POST /v1/chat/completions`: OpenAI's fields on top of the native ones."""

    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v:
            raise ValueError("chat completion logprobs are not supported yet; /v1/completions returns "
                             "logprobs (send the rendered conversation as its prompt)")
        return v

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(Unsupported):
    """`POST /v1/completions`: one prompt (a string or token ids) or a list of them, one choice each."""

    model_config = ConfigDict(extra="ignore")
    prompt: Any  # str | list[str] | list[int] | list[list[int]], checked below with one clear message
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, le=MAX_NEW_TOKENS)  # None: OpenAI's 16; 0 scores the prompt only
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    n: int = Field(1, ge=1, le=1)
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = None

    _top_p = field_validator("top_p")(classmethod(lambda cls, v: _check_top_p(v)))
    _stop = field_validator("stop")(classmethod(lambda cls, v: _stop_list(v)))

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        def ids(x) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        prompts = [v] if isinstance(v, str) or (ids(v) and v) else v
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) or ids(p) for p in prompts):
            raise ValueError("send a string, a list of strings, a list of token ids or a list of such lists")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"{len(prompts)} prompts in one request; the limit is {MAX_PROMPTS}")
        for i, p in enumerate(prompts):
            if isinstance(p, str) and len(p) > MAX_TOTAL_CHARS:
                raise ValueError(f"prompt {i} has {len(p)} characters; the limit is {MAX_TOTAL_CHARS}")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise ValueError("insertion (suffix) is not supported: this model only continues text")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class TokenizeRequest(BaseModel):
    """`POST /tokenize` as vLLM takes it; `add_special_tokens` puts BOS in front, as /v1/completions does."""

    prompt: str = Field(max_length=MAX_TOTAL_CHARS)
    model: str | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    tokens: list[int]
    model: str | None = None


def describe_errors(errors: list[dict]) -> tuple[str, str | None]:
    """(one sentence, the offending parameter) from pydantic/FastAPI validation errors."""
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    # union branches add their type names to the location (`str`, `list[str]`): they are noise here
    loc = [p for p in loc if not p.startswith(("list[", "str", "function-after", "ContentPart"))]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON; send a JSON object", None
    if param is None:  # a whole-request check (the character limits): the message names its field
        return msg, "messages" if msg.startswith(("messages", "the messages")) else None
    if err.get("type") == "missing":
        return f"{param} is required", param
    return f"{param}: {msg}", param
