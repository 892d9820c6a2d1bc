"""A cache lookup of a checkpoint on s3:// (moto's server on 127.0.0.1): sizes and ETags from one listing
against downloading and hashing every file, measured in the same run (the full hash is the reference).

    .venv/bin/python bench/cache_lookup.py [--mb 1024] [--ranks 8]

The checkpoint has d20's shape of files: one model file and one optimizer file per rank, `--mb` in all
(a d20 model is ~2.2 GB in bf16, its optimizer files more). Prints seconds for each lookup and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import s3fs

from nanochat_core import storage
from nanochat_core.artifacts import make_ref, verify
from nanochat_core.checkpoint import meta_file, model_file, optim_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from download_fixtures import start_moto  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="total size of the checkpoint's files")
    ap.add_argument("--ranks", type=int, default=8, help="optimizer files, one per rank")
    args = ap.parse_args()

    moto, port = start_moto()  # the tests' own: moto's server on a free loopback port, once it answers
    try:
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        s3fs.S3FileSystem().mkdir("bench")
        ckpt = "s3://bench/base_checkpoints/d20"
        # Half the bytes in the model, half over the optimizer files (random: no compression anywhere).
        files = {model_file(1000): args.mb // 2, **{optim_file(1000, r): args.mb // 2 // args.ranks for r in range(args.ranks)}}
        for name, mb in files.items():
            storage.write_bytes(f"{ckpt}/{name}", os.urandom(mb << 20))
        storage.write_text(f"{ckpt}/{meta_file(1000)}", '{"step": 1000}')
        t0 = time.perf_counter()
        ref = make_ref("base_train", ckpt)
        written = time.perf_counter() - t0
        total = sum(e["size"] for e in ref["manifest"].values()) / 1e6
        print(f"checkpoint: {len(ref['manifest'])} files, {total:,.0f} MB on moto; manifest (hash + ETags) {written:.1f}s")

        timings = {}
        for mode, full in (("full", True), ("etag", False)):
            t0 = time.perf_counter()
            assert verify(ref, full=full), mode
            timings[mode] = time.perf_counter() - t0
            print(f"lookup {mode:4s}: {timings[mode]:8.3f}s")
        print(f"etag/full lookup time ratio: {timings['etag'] / timings['full']:.5f} "
              f"({timings['full'] / timings['etag']:,.0f}x faster)")
    finally:
        moto.terminate()
        moto.wait()


if __name__ == "__main__":
    main()
