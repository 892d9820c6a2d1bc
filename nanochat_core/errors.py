"""Errors a user can cause, and the one place they become a one-sentence message.

Anything a user can get wrong (a config value, a missing shard, a corrupt checkpoint) is raised as
`UserError` with a sentence that names the problem and the fix. Entry points wrap their body in
`exit_on_user_error`, which prints that sentence and exits with status 2 instead of a traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

from pydantic import ValidationError

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A problem the user can fix; its message is one sentence naming the problem and the fix."""


def warn(message: str) -> None:
    """A problem the run survives (a source the registry no longer serves): one line on stderr, which the
    flow streams into the task log."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def group_by_reason(reasons: dict[str, str]) -> dict[str, list[str]]:
    """{reason: [names]} from {name: reason}, in first-seen order."""
    grouped: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        grouped.setdefault(reason, []).append(name)
    return grouped


def with_reasons(reasons: dict[str, str]) -> str:
    """`a, b (why); c (other why)`: what a run went without and why, names sharing a reason together."""
    return "; ".join(f"{', '.join(names)} ({reason})" for reason, names in group_by_reason(reasons).items())


def describe_validation_error(err: ValidationError, flag_style: bool = True) -> str:
    """One sentence for the first problem in a pydantic ValidationError, naming the field as a flag."""
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"] if not isinstance(part, int)]
    name = loc[-1] if loc else "value"
    field = "--" + name.replace("_", "-") if flag_style else ".".join(loc)
    value = first.get("input")
    msg = first["msg"]
    msg = msg[0].lower() + msg[1:] if msg else msg
    if not loc:  # a check of the whole config (an unknown preset): its own sentence names the problem
        return msg.removeprefix("value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown setting {'.'.join(loc)!s}; check its spelling against `nanochat <stage> --help`"
    return f"invalid value {value!r} for {field}: {msg}; pass a valid value or drop the flag"


def store_problem(err: BaseException) -> str | None:
    """One sentence for an object store that cannot be used at all (no credentials, endpoint unreachable),
    which every stage on an s3:// base dir meets first; None for anything else."""
    try:
        from botocore.exceptions import EndpointConnectionError, NoCredentialsError
    except ImportError:  # no S3 support installed: nothing of the kind can be raised
        return None
    if isinstance(err, NoCredentialsError):
        return ("no credentials for the object store; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE), or use a local NANOCHAT_BASE_DIR")
    if isinstance(err, EndpointConnectionError):
        return f"cannot reach the object store ({err}); check AWS_ENDPOINT_URL and the network"
    return None


def exit_on_user_error(fn: F) -> F:
    """Run an entry point; turn UserError / ValidationError into `error: ...` and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except ValidationError as e:
            print(f"error: {describe_validation_error(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception as e:
            sentence = store_problem(e)
            if sentence is None:
                raise
            print(f"error: {sentence}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
