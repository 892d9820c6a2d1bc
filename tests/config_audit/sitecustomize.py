"""Records which config fields a stage process reads (tests only: on PYTHONPATH for the session speedrun).

Python imports `sitecustomize` at start-up; in a process started as `python -m nanochat_core.stages.<stage>`
(directly or as a torchrun rank) this wraps attribute access on the config models and, at exit, writes
`$NANOCHAT_CONFIG_AUDIT/<stage>-<pid>.json`: the `section.field` names read, the inputs the
launcher handed over, and when the process started and ended (wall clock). Any other process is left alone. tests/test_cache_keys.py reads the records.
"""

import atexit
import json
import os
import sys
import time

STARTED = time.time()


def _stage() -> str | None:
    argv = getattr(sys, "orig_argv", [])
    for flag, module in zip(argv, argv[1:]):
        if flag == "-m" and module.startswith("nanochat_core.stages."):
            return module.rsplit(".", 1)[-1]
    return None


def _install(stage: str, out_dir: str) -> None:
    from nanochat_core import config

    sections = {field.annotation: name for name, field in config.PipelineConfig.model_fields.items()
                if isinstance(field.annotation, type) and issubclass(field.annotation, config.StageConfig)}
    read: set[str] = set()
    get = object.__getattribute__

    def audited(self, name):
        cls = get(self, "__class__")
        if cls is config.PipelineConfig:
            if name in cls.model_fields and name not in sections.values():
                read.add(name)  # a top-level value such as `preset`
            elif name.startswith("model_dump"):
                read.add("*")  # the whole pipeline config: every section
        elif cls in sections and (name in cls.model_fields or name.startswith("model_dump")):
            read.add(f"{sections[cls]}.{'*' if name.startswith('model_dump') else name}")
        return get(self, name)

    config.StageConfig.__getattribute__ = audited

    def dump() -> None:
        inputs_path = os.environ.get("NANOCHAT_INPUTS_PATH")
        inputs = json.load(open(inputs_path)) if inputs_path and os.path.exists(inputs_path) else None
        record = {"stage": stage, "argv": sys.orig_argv, "read": sorted(read), "inputs": inputs,
                  "started": STARTED, "ended": time.time()}
        with open(os.path.join(out_dir, f"{stage}-{os.getpid()}.json"), "w") as f:
            json.dump(record, f)

    atexit.register(dump)


if os.environ.get("NANOCHAT_CONFIG_AUDIT") and _stage():
    _install(_stage(), os.environ["NANOCHAT_CONFIG_AUDIT"])
