"""Load test of `nanochat serve` on loopback: N concurrent streaming clients for D seconds.

    .venv/bin/python bench/serve_load.py                       # 20 clients, 30 s, a tiny random-init model
    .venv/bin/python bench/serve_load.py --source sft --clients 20 --duration 30 --max-tokens 64

Starts the real server (`python -m nanochat_core.cli serve`) on 127.0.0.1 in a subprocess, measures a
single-client reference first (same server, same run), then the load. Bounded: every request has a
timeout, clients stop starting requests after --duration, and the whole run is cut off at duration + 120 s;
the server is always stopped at the end. Prints p50/p95 time to first token (TTFT), tokens/s per stream
two ways: end to end as the client sees it (completion tokens over the whole request, queueing included)
and the server's generation rate while a stream holds its replica (/stats), aggregate tokens/s,
errors, the server's resident memory over the run, and ratios against the single-client reference.
Exit status 1 on any error or if the server's memory grew more than 20% during the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Why is the sky blue?", "Write a haiku about the sea.", "What is 12 times 7?",
           "Tell me about the moon 🌙.", "Explain rotary embeddings in one paragraph."]


@dataclass
class Sample:
    ttft: float  # request sent -> first content token
    total_s: float  # request sent -> end of stream
    tokens: int
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, base: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NANOCHAT_API_KEY", None)
    if base:
        env["NANOCHAT_BASE_DIR"] = base
    cmd = [sys.executable, "-m", "nanochat_core.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--workers-per-device", str(args.workers_per_device), "--max-queue", str(max(64, args.clients * 2))]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    elif args.source:
        cmd += ["--source", args.source]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).json().get("ready"):
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become ready in 300 s")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> Sample:
    body = {"model": "nanochat", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Sample(0, 0, 0, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Sample(0, 0, 0, event["error"]["message"])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice["delta"].get("content") and first is None:
                        first = time.perf_counter()
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return Sample(0, 0, 0, f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    return Sample((first or end) - t0, end - t0, tokens)  # no content at all: an immediate end token


async def run_clients(url: str, clients: int, duration: float, max_tokens: int, requests_each: int | None,
                      timeout: float) -> list[Sample]:
    samples: list[Sample] = []
    stop_at = time.perf_counter() + duration

    async def client_loop(i: int) -> None:
        async with httpx.AsyncClient(timeout=timeout) as client:
            n = 0
            while (requests_each is None and time.perf_counter() < stop_at) or (requests_each is not None and n < requests_each):
                samples.append(await one_request(client, url, PROMPTS[(i + n) % len(PROMPTS)], max_tokens))
                n += 1

    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    return samples


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summary(name: str, samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.error is None]
    rates = [s.tokens / s.total_s for s in ok if s.total_s > 0]
    out = {
        "requests": len(samples), "errors": len(samples) - len(ok),
        "ttft_p50_s": pct([s.ttft for s in ok], 0.5), "ttft_p95_s": pct([s.ttft for s in ok], 0.95),
        "e2e_tok_s_p50": statistics.median(rates) if rates else float("nan"),
        "aggregate_tok_s": sum(s.tokens for s in ok) / wall if wall else float("nan"),
        "tokens": sum(s.tokens for s in ok),
    }
    print(f"{name:<10} requests {out['requests']:>4}  errors {out['errors']}  "
          f"TTFT p50 {out['ttft_p50_s']:.3f}s p95 {out['ttft_p95_s']:.3f}s  "
          f"end-to-end tokens/s per stream (p50) {out['e2e_tok_s_p50']:.1f}  aggregate {out['aggregate_tok_s']:.1f} tok/s")
    for s in samples:
        if s.error:
            print(f"  error: {s.error}")
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds during which clients start requests")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reference-requests", type=int, default=5, help="sequential single-client requests first")
    ap.add_argument("--workers-per-device", type=int, default=1)
    ap.add_argument("--source", default=None, help="serve this checkpoint family of NANOCHAT_BASE_DIR")
    ap.add_argument("--checkpoint", default=None, help="serve this checkpoint directory/URL/models:/ URI")
    ap.add_argument("--depth", type=int, default=2, help="depth of the random-init model (without --source)")
    ap.add_argument("--dim", type=int, default=128, help="width of the random-init model (without --source)")
    args = ap.parse_args()

    tmp = None
    base = None
    if not (args.source or args.checkpoint):  # a tiny random-init model: measures the serving path, not quality
        sys.path.insert(0, str(ROOT / "tests"))
        from serve_fixtures import make_tiny_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="serve_load_")
        base = tmp.name
        make_tiny_checkpoint(base, seq_len=256, depth=args.depth, dim=args.dim)
        print(f"model: random-init d{args.depth} (dim {args.dim}, vocab 512, context 256) in {base}")

    proc, url = start_server(args, base)
    server = psutil.Process(proc.pid)
    hard_limit = args.duration + 120
    try:
        # warm up (first-call allocations), then the single-client reference
        asyncio.run(run_clients(url, 1, 0, args.max_tokens, 2, timeout=60))
        t = time.perf_counter()
        ref = asyncio.run(run_clients(url, 1, 0, args.max_tokens, args.reference_requests, timeout=60))
        ref_s = summary("reference", ref, time.perf_counter() - t)
        ref_server_rate = httpx.get(url + "/stats", timeout=10).json()["stream_tok_s_p50"]

        rss_start = server.memory_info().rss
        rss_samples = [rss_start]

        async def load() -> list[Sample]:
            async def sample_memory():
                while True:
                    await asyncio.sleep(1)
                    rss_samples.append(server.memory_info().rss)

            sampler = asyncio.create_task(sample_memory())
            try:
                return await asyncio.wait_for(
                    run_clients(url, args.clients, args.duration, args.max_tokens, None, timeout=hard_limit),
                    hard_limit)
            finally:
                sampler.cancel()

        t = time.perf_counter()
        samples = asyncio.run(load())
        wall = time.perf_counter() - t
        load_s = summary(f"load x{args.clients}", samples, wall)
        rss_end = server.memory_info().rss
        stats = httpx.get(url + "/stats", timeout=10).json()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if tmp:
            tmp.cleanup()

    mb = 1 / 2**20
    growth = rss_end / rss_start
    print(f"load wall {wall:.1f}s; server RSS start {rss_start * mb:.0f} MB, max {max(rss_samples) * mb:.0f} MB, "
          f"end {rss_end * mb:.0f} MB (end/start {growth:.3f}); server counted {stats['completed']} completed, "
          f"{stats['failed']} failed; server-side tokens/s per stream (p50, on its replica): reference {ref_server_rate}, after load {stats['stream_tok_s_p50']}")
    print(f"ratios vs single-client reference: end-to-end tokens/s per stream {load_s['e2e_tok_s_p50'] / ref_s['e2e_tok_s_p50']:.2f}x, "
          f"generation tokens/s per stream {stats['stream_tok_s_p50'] / ref_server_rate:.2f}x, "
          f"TTFT p50 {load_s['ttft_p50_s'] / ref_s['ttft_p50_s']:.1f}x, "
          f"aggregate tokens/s {load_s['aggregate_tok_s'] / ref_s['aggregate_tok_s']:.2f}x")
    failed = load_s["errors"] or ref_s["errors"] or growth > 1.2
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
