"""Peak memory of `corpus build --from` against input size: the build streams, so RSS should stay flat.

    python bench/corpus_from_files_rss.py --mb 100 1000 --text FILE   # FILE repeated up to each size

Each size runs in a fresh process (ru_maxrss is a high-water mark per process); the input is one .txt
file of FILE repeated and one .jsonl of its fortunes, half the size each.

Measured 2026-12-05 on 2 shared cores with FILE = fortunes-zh's `chinese` (2.1 MB of UTF-8 Chinese):
    10 MB input:   179 MB peak RSS,  2.9 s
    100 MB input:  202 MB peak RSS,  7.7 s  (51M characters, 25 shards)
    1000 MB input: 202 MB peak RSS, 28.1 s  (497M characters, 248 shards)
Flat: the process holds one text buffer (64K characters) and at most two shards of documents.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def build(folder: str, out: str) -> None:
    from nanochat_core.data.corpus import build_from_files

    start = time.perf_counter()
    m = build_from_files([folder], "text", 2_000_000, out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"docs": m["total_docs"], "chars": m["total_chars"], "shards": m["num_shards"],
                      "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(rss)}))


def make_input(folder: str, text: bytes, mb: int) -> None:
    os.makedirs(folder, exist_ok=True)
    half = mb * 1_000_000 // 2
    with open(os.path.join(folder, "big.txt"), "wb") as f:
        written = 0
        while written < half:
            f.write(text)
            written += len(text)
    with open(os.path.join(folder, "big.jsonl"), "w") as f:
        written = 0
        docs = text.decode("utf-8", errors="ignore").split("\n%\n")
        while written < half:
            for d in docs:
                line = json.dumps({"text": d}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--text", required=True)
    p.add_argument("--child", nargs=2)
    ns = p.parse_args()
    if ns.child:
        return build(*ns.child)
    text = open(ns.text, "rb").read()
    for mb in ns.mb:
        with tempfile.TemporaryDirectory() as tmp:
            make_input(f"{tmp}/in", text, mb)
            out = subprocess.run([sys.executable, __file__, "--text", ns.text, "--child", f"{tmp}/in", f"{tmp}/out"],
                                 capture_output=True, text=True, check=True)
            print(f"{mb} MB input: {out.stdout.strip()}")


if __name__ == "__main__":
    main()
