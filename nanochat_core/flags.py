"""The command line of configs: one `--kebab-case` flag per config field, presets, `--config cfg.json`,
and the speedrun's `--set stage.field=value`. config.py declares; this module parses.

    parser = stage_parser("nanochat plan", "...", {"base_train": None, "plan": ["gpu"]})
    cfg = config_from_args(parser.parse_args(argv))      # preset (or --config file), then the flags
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from nanochat_core.config import PipelineConfig, StageConfig, stage_names
from nanochat_core.errors import UserError, describe_validation_error
from nanochat_core.presets import get_preset


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _parse_int(text: str) -> int:
    """Integers, also written as 2e9 or 2_000_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def _flag_type(annotation: Any):
    """The argparse `type`/`choices` for a field annotation; None for non-flag fields."""
    inner, optional = _unwrap_optional(annotation)
    origin = typing.get_origin(inner)
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"choices": list(typing.get_args(inner))}
    if origin is list:
        item = typing.get_args(inner)[0]
        choices = typing.get_args(item) if typing.get_origin(item) is Literal else None

        def parse_list(text: str) -> list[str]:
            items = [s.strip() for s in text.split(",") if s.strip()]
            bad = [s for s in items if choices and s not in choices]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"{bad[0]!r} is not one of {', '.join(choices)}"
                )
            return items

        return {"type": parse_list}
    if inner is int:
        return {"type": _parse_int}
    if inner in (float, str):
        return {"type": inner}
    return None


def add_config_flags(parser: argparse.ArgumentParser, stage: str, only: list[str] | None = None,
                     root: type[BaseModel] = PipelineConfig) -> None:
    """Add one `--kebab-case` flag per field of the `stage` section of `root` (or just `only`).

    Unset flags stay absent (`SUPPRESS`), so a flag overrides the preset only when given.
    """
    cls = root.model_fields[stage].annotation
    group = parser.add_argument_group(f"{stage} ({cls.__doc__.splitlines()[0]})")
    for name, field in cls.model_fields.items():
        kind = _flag_type(field.annotation)
        if kind is None or (only is not None and name not in only):
            continue
        help_text = f"{field.description} (default: {field.default})"
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("repeat"):  # a list given once per flag (`--from A --from B`): items may hold commas
            kind = {"action": "append", "type": str}
        names = dict.fromkeys("--" + str(n).replace("_", "-") for n in (extra.get("flag", name), name))
        group.add_argument(
            *names,
            dest=f"{stage}.{name}",
            metavar=str(extra.get("flag", name)).upper() if "type" in kind else None,
            default=argparse.SUPPRESS,
            help=help_text.replace("%", "%%"),
            **kind,
        )


class CommandParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: ...`, exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def stage_parser(prog: str, description: str, stages: dict[str, list[str] | None],
                 root: type[BaseModel] = PipelineConfig) -> argparse.ArgumentParser:
    """A command's parser: for pipeline stages `--preset` and `--config cfg.json`, then the sections' flags."""
    parser = CommandParser(prog=prog, description=description)
    if root is PipelineConfig:
        parser.add_argument("--preset", default=None, help="start from this preset (default: d20)")
        parser.add_argument(
            "--config", default=None, help="pipeline config JSON written by the launcher (flags still override)"
        )
    for stage, only in stages.items():
        add_config_flags(parser, stage, only, root)
    return parser


def config_from_args(ns: argparse.Namespace, root: type[BaseModel] = PipelineConfig) -> BaseModel:
    """The config a command runs with: a pipeline stage's preset or `--config` file (the serving
    commands': the declared defaults), then its flags."""
    if root is not PipelineConfig:
        cfg = root()
    elif ns.config is not None and ns.preset is not None:
        raise UserError("pass either --preset or --config, not both; --config already holds a preset")
    else:
        cfg = load_json(PipelineConfig, ns.config) if ns.config else get_preset(ns.preset or "d20")
    flags: dict[str, dict[str, Any]] = {}
    for key, value in vars(ns).items():
        stage, dot, field = key.partition(".")
        if dot:
            flags.setdefault(stage, {})[field] = value
    update = {stage: override(getattr(cfg, stage), values) for stage, values in flags.items()}
    return cfg.model_copy(update=update)


def override(cfg: StageConfig, values: dict[str, Any]) -> StageConfig:
    """A copy of `cfg` with `values` applied and validated; errors name the flag and the fix."""
    try:
        return type(cfg).model_validate(type(cfg).merged(cfg.model_dump(), values))
    except ValidationError as e:
        raise UserError(describe_validation_error(e)) from None


def load_json(cls: type[StageConfig], path: str | Path) -> StageConfig:
    """Read the `--config cfg.json` a launcher wrote for a child process."""
    try:
        return cls.model_validate_json(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass the path the launcher wrote") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory; pass the JSON file the launcher wrote") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; pass the JSON file the launcher wrote") from None
    except ValidationError as e:
        if e.errors()[0]["type"] == "json_invalid":  # no field to name: the file itself does not parse
            raise UserError(f"config file {path} is not valid JSON ({e.errors()[0]['msg']}); pass the file "
                            "the launcher wrote (a PipelineConfig as JSON)") from None
        raise UserError(
            f"config file {path}: {describe_validation_error(e, flag_style=False)}"
        ) from None


def set_dotted(cfg: PipelineConfig, assignment: str) -> PipelineConfig:
    """Apply `stage.field=value` (the speedrun's `--set`) to a pipeline config, validated."""
    key, sep, raw = assignment.partition("=")
    stage, dot, field = key.strip().partition(".")
    if not sep or not dot:
        raise UserError(f"--set {assignment!r} is not stage.field=value; write e.g. base_train.depth=4")
    if stage not in PipelineConfig.model_fields or not isinstance(getattr(cfg, stage), BaseModel):
        raise UserError(f"--set {assignment!r}: unknown stage {stage!r}; stages are {', '.join(stage_names())}")
    sub = getattr(cfg, stage)
    if field not in type(sub).model_fields:
        raise UserError(f"--set {assignment!r}: {stage} has no field {field!r}; see `nanochat plan --help`")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # bare strings: --set download.url_template=s3://bucket/x
    return cfg.model_copy(update={stage: override(sub, {field: value})})


