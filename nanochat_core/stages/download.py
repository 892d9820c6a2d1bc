"""Stage `download`: pretraining shards 0..N-1 plus the val shard into <base>/base_data, through fsspec.

    nanochat download -n 8                                   # FineWeb-Edu over https (val = 01822)
    nanochat download -n 8 --url-template 's3://bucket/fineweb/shard_{index:05d}.parquet' --workers 8
    nanochat download --preset tiny                           # 4 shards + val from the sample corpus
    nanochat download -n 4 --url-template file:///data/corpus --val-index 19
    python -m nanochat_core.stages.download --config cfg.json

`--url-template sample` reads the sample corpus its `corpus` input names (run by hand: what `nanochat corpus
build` wrote, <base>/sample_corpus, or --corpus) through a file:// URL. s3:// takes its endpoint and credentials from the usual
AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). The val shard is the highest index at
the source unless --val-index says otherwise. Writes base_data/manifest.json (index, bytes, rows,
sha256 per shard, and a digest the flow's cache key uses).
"""

from __future__ import annotations

import argparse

from nanochat_core import artifacts, storage
from nanochat_core.config import SAMPLE_SOURCE, PipelineConfig
from nanochat_core.data.download import download_shards, find_val_index, resolve_template
from nanochat_core.data.shards import shard_name
from nanochat_core.errors import UserError, exit_on_user_error
from nanochat_core.paths import join, output_dir
from nanochat_core.stage_args import parse, parser


def source_template(cfg: PipelineConfig, inputs: dict[str, dict]) -> str:
    """The URL template to fetch from; `sample` means the `corpus` input as a file:// source."""
    source = cfg.download.url_template
    if source == SAMPLE_SOURCE:
        corpus = inputs.get("corpus", {}).get("path")
        if corpus is None or not storage.exists(join(corpus, "manifest.json")):
            raise UserError(f"no sample corpus{' in ' + corpus if corpus else ''}; run `nanochat corpus build` first "
                            "or pass --corpus")
        source = corpus if "://" in corpus else "file://" + corpus
    return resolve_template(source)


def run(cfg: PipelineConfig, inputs: dict[str, dict], progress: bool = True) -> dict:
    dl = cfg.download
    template = source_template(cfg, inputs)
    val_index = dl.val_index if dl.val_index is not None else find_val_index(template)
    if val_index == 0:
        raise UserError(f"the source {template} holds only shard 0, which would be the val shard; a download "
                        "needs training shards too: check --url-template or pass --val-index")
    if dl.num_shards > val_index:
        raise UserError(
            f"--num-shards {dl.num_shards} reaches the val shard (index {val_index}); "
            f"the source has {val_index} training shards, pass -n {val_index} or fewer"
        )
    indices = [*range(dl.num_shards), val_index]
    out = output_dir("download", cfg)
    manifest = download_shards(template, indices, out, workers=dl.workers, val_index=val_index, progress=progress)
    seconds = manifest["seconds"]
    figures = {
        "url_template": template,
        "num_shards": dl.num_shards,
        "val_index": val_index,
        "total_bytes": sum(e["bytes"] for e in manifest["shards"] if e["index"] in indices),
        "total_rows": sum(e["rows"] for e in manifest["shards"] if e["index"] in indices),
        "fetched": manifest["fetched"],
        "skipped": manifest["skipped"],
        "fetched_bytes": manifest["fetched_bytes"],
        "seconds": seconds,
        "mb_per_second": round(manifest["fetched_bytes"] / 1e6 / seconds, 2) if seconds > 0 else None,
    }
    return artifacts.make_ref("download", out, figures, [shard_name(i) for i in indices])


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = parser("download", "Fetch pretraining shards 0..N-1 plus the val shard into $NANOCHAT_BASE_DIR/base_data.")
    p.add_argument(
        "-n", dest="download.num_shards", type=int, default=argparse.SUPPRESS, metavar="N",
        help="same as --num-shards",
    )
    cfg, inputs = parse("download", argv, p)
    result = run(cfg, inputs)
    artifacts.emit(result)
    rate = f", {result['mb_per_second']} MB/s" if result["fetched"] else ""
    print(
        f"{result['num_shards']} train shards + val {result['val_index']:05d} in {result['path']}: "
        f"{result['fetched']} fetched, {result['skipped']} already there "
        f"({result['total_bytes'] / 1e6:.1f} MB, {result['total_rows']:,} rows; "
        f"{result['seconds']:.1f}s{rate})"
    )


if __name__ == "__main__":
    main()
