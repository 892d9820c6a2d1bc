"""Tokenizer training benchmark: tokenizer_rs against rustbpe and HF tokenizers, in one run.

    python bench/tokenizer.py --corpus ~/.cache/nanochat/sample_corpus --vocab-size 65536
    python bench/tokenizer.py --corpus docs.txt --vocab-size 8192 --repeat 2

--corpus is a UTF-8 text file whose documents are separated by empty lines, or a directory of
parquet shards (`text` column). All three trainers see the same documents, the same split pattern
and the same number of merges (vocab size - 256 bytes - 9 specials). Each training runs in its own
child process, which loads the documents first and then measures only the training: wall time and
the peak resident memory reached during it (the high-water mark is reset after loading). With
--repeat N the trainers take turns N times and the fastest time of each counts, which damps noise
from other work on the machine; memory is the highest peak seen. Prints, among its lines:

    time ratio vs rustbpe: X.XX          (ours / rustbpe; below 1 means faster)
    merges identical to rustbpe: yes|no
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPECIALS = 9  # nanochat's special tokens take the last ids, outside the merges
TRAINERS = ["tokenizer_rs", "rustbpe", "hf_tokenizers"]


def load_docs(corpus: str, max_chars: int | None) -> list[str]:
    """Documents of a text file (separated by empty lines) or of a directory of parquet shards."""
    path = Path(corpus).expanduser()
    if path.is_dir():
        import pyarrow.parquet as pq

        files = sorted(glob.glob(str(path / "*.parquet")))
        if not files:
            raise SystemExit(f"error: no *.parquet files in {path}; pass a text file or a shard directory")
        docs: list[str] = []
        for f in files:
            docs += pq.read_table(f, columns=["text"]).column("text").to_pylist()
    elif path.is_file():
        docs = [d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    else:
        raise SystemExit(f"error: {path} does not exist; pass a text file or a directory of parquet shards")
    if max_chars is not None:
        kept, seen = [], 0
        for d in docs:
            if seen >= max_chars:
                break
            kept.append(d)
            seen += len(d)
        docs = kept
    return docs


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so it covers only what follows (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB, from /proc (ru_maxrss where /proc is missing)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_one(name: str, docs: list[str], merges: int, pattern: str) -> list[bytes] | None:
    """Train `name`; returns the token bytes in id order (for the merge comparison) or None."""
    if name == "tokenizer_rs":
        import tokenizer_rs

        return tokenizer_rs.train(iter(docs), 256 + merges, pattern).token_bytes()
    if name == "rustbpe":
        import rustbpe

        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(docs), 256 + merges, pattern=pattern)
        ranks = sorted(tok.get_mergeable_ranks(), key=lambda kv: kv[1])
        return [bytes(b) for b, _ in ranks]
    if name == "hf_tokenizers":
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=256 + merges, show_progress=False, min_frequency=0,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        tok.train_from_iterator(iter(docs), trainer)
        return None
    raise ValueError(name)


def worker(args: argparse.Namespace) -> None:
    """Child process: load, reset the memory high-water mark, train, report JSON on stdout."""
    import tokenizer_rs

    docs = load_docs(args.corpus, args.max_chars)
    baseline = rss_mb("VmRSS")
    exact_peak = reset_peak_rss()
    t0 = time.perf_counter()
    token_bytes = train_one(args.worker, docs, args.vocab_size - 256 - SPECIALS, tokenizer_rs.SPLIT_PATTERN)
    seconds = time.perf_counter() - t0
    if token_bytes is not None and args.merges_out:
        Path(args.merges_out).write_bytes(pickle.dumps(token_bytes))
    print(json.dumps({"seconds": seconds, "peak_mb": rss_mb("VmHWM"), "baseline_mb": baseline,
                      "exact_peak": exact_peak}))


def run_child(name: str, args: argparse.Namespace, merges_out: str) -> dict:
    cmd = [sys.executable, __file__, "--corpus", args.corpus, "--vocab-size", str(args.vocab_size),
           "--worker", name, "--merges-out", merges_out]
    if args.max_chars is not None:
        cmd += ["--max-chars", str(args.max_chars)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="text file (docs separated by empty lines) or parquet dir")
    parser.add_argument("--vocab-size", type=int, default=65_536, help="tokenizer vocab incl. 256 bytes + 9 specials")
    parser.add_argument("--max-chars", type=int, default=None, help="use only the first documents up to this many chars")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all trainers; the fastest time of each counts")
    parser.add_argument("--skip", default="", help="comma-separated trainers to leave out (e.g. hf_tokenizers)")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--merges-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vocab_size < 256 + SPECIALS + 1:
        raise SystemExit(f"error: --vocab-size must be at least {256 + SPECIALS + 1}")
    if args.worker:
        return worker(args)

    docs = load_docs(args.corpus, args.max_chars)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    nchars = sum(len(d) for d in docs)
    del docs
    merges = args.vocab_size - 256 - SPECIALS
    trainers = [t for t in TRAINERS if t not in args.skip.split(",")]
    if "tokenizer_rs" not in trainers:
        raise SystemExit("error: tokenizer_rs is the subject of this benchmark; do not skip it")
    print(f"corpus: {args.corpus}: {nchars:,} chars, {nbytes / 1e6:.1f} MB UTF-8")
    print(f"vocab {args.vocab_size:,} = 256 bytes + {merges:,} merges + {SPECIALS} specials; "
          f"{os.cpu_count()} CPUs; {args.repeat} round(s)")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeat):
            for name in trainers:
                r = run_child(name, args, os.path.join(tmp, f"{name}.pkl"))
                print(f"  round {round_ + 1} {name:<14} {r['seconds']:7.2f} s  peak {r['peak_mb']:7.0f} MB", flush=True)
                best = results.setdefault(name, r)
                best["seconds"] = min(best["seconds"], r["seconds"])
                best["peak_mb"] = max(best["peak_mb"], r["peak_mb"])
        ours = pickle.loads(Path(tmp, "tokenizer_rs.pkl").read_bytes())
        theirs = pickle.loads(Path(tmp, "rustbpe.pkl").read_bytes()) if "rustbpe" in results else None

    print(f"{'trainer':<14} {'time (s)':>9} {'MB/s':>7} {'peak RSS (MB)':>14} {'RSS before (MB)':>16}")
    for name, r in results.items():
        print(f"{name:<14} {r['seconds']:9.2f} {nbytes / 1e6 / r['seconds']:7.1f} {r['peak_mb']:14.0f} "
              f"{r['baseline_mb']:16.0f}")
    if not results["tokenizer_rs"]["exact_peak"]:
        print("note: could not reset the memory high-water mark; peaks include loading the documents")
    if "rustbpe" in results:
        rb = results["rustbpe"]
        print(f"time ratio vs rustbpe: {results['tokenizer_rs']['seconds'] / rb['seconds']:.2f}")
        print(f"peak memory ratio vs rustbpe: {results['tokenizer_rs']['peak_mb'] / rb['peak_mb']:.2f}")
    if "hf_tokenizers" in results:
        hf = results["hf_tokenizers"]
        print(f"time ratio vs hf tokenizers: {results['tokenizer_rs']['seconds'] / hf['seconds']:.2f}")
    if theirs is not None:
        same = ours == theirs
        print(f"merges identical to rustbpe: {'yes' if same else 'no'}")
        if not same:
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            print(f"  first difference at id {first}: ours {ours[first:first + 1]} rustbpe {theirs[first:first + 1]} "
                  f"(vocab {len(ours)} vs {len(theirs)})")


if __name__ == "__main__":
    main()
