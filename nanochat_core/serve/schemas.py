"""Request shapes of the two chat endpoints, their input limits, and OpenAI's error shape.

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
MAX_BODY_BYTES = 1 << 20  # 32,000 characters are at most 128 KB of UTF-8; JSON overhead fits easily


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


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

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float | None) -> float | None:
        # The engine samples with temperature and top-k only; 1.0 (what clients send by default) is a no-op.
        if v is not None and v < 1:
            raise ValueError("nucleus sampling is not supported by this model's engine; send top_p 1 "
                             "(or none) and limit with top_k instead")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings")
        return stops

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


class OpenAIChatRequest(ChatRequest):
    """`POST /v1/chat/completions`: OpenAI's fields on top of the native ones."""

    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request: the pool serves one stream per replica

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


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
