"""Shard download throughput: s3:// from moto's server on 127.0.0.1 against a file:// copy of the same
shards, measured in the same run (the file:// source is the reference, so the ratio is what to read).

    .venv/bin/python bench/download.py [--shards 8] [--shard-chars 8000000] [--workers 4]

Prints MB/s for each source and the s3/file ratio. The shards are synthetic text written with
`write_shards`, so the benchmark needs no corpus build.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import s3fs

from nanochat_core.data.download import download_shards
from nanochat_core.data.shards import write_shards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_docs(total_chars: int, seed: int = 0):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(30_000)]
    made = 0
    while made < total_chars:
        doc = " ".join(rng.choices(vocab, k=rng.randint(100, 1500)))
        made += len(doc)
        yield doc


def timed(template: str, n: int, workers: int, out: str) -> tuple[float, int]:
    manifest = download_shards(template, [*range(n), n], out, workers=workers, progress=False)
    return manifest["seconds"], manifest["fetched_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-chars", type=int, default=8_000_000)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bench-download-")
    src = os.path.join(work, "source")
    write_shards(synthetic_docs(args.shard_chars * (args.shards + 1)), src, args.shard_chars)
    n = len(os.listdir(src)) - 1

    port = free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        fs.put(src + "/", "bench/corpus/", recursive=True)

        results = {}
        for name, template in [
            ("file", f"file://{src}/shard_{{index:05d}}.parquet"),
            ("s3", "s3://bench/corpus/shard_{index:05d}.parquet"),
        ]:
            seconds, nbytes = timed(template, n, args.workers, os.path.join(work, f"dest-{name}"))
            results[name] = nbytes / 1e6 / seconds
            print(f"{name:5s} {n} shards + val, {nbytes / 1e6:.1f} MB in {seconds:.2f}s: {results[name]:.1f} MB/s")
        print(f"s3/file throughput ratio: {results['s3'] / results['file']:.3f}")
    finally:
        moto.terminate()
        moto.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
