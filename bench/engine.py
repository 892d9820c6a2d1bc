"""Engine decoding speed: KV-cache generation against recomputing the whole sequence every token
(the reference, measured in the same run), and k samples from one prefill against k separate runs;
plus the sandboxed calculator's cost per call against evaluating the same expression in-process.

    .venv/bin/python bench/engine.py [--depth 4] [--prompt 256] [--new 128] [--samples 8] [--threads 1]

Prints tokens/s for each way and the ratios to read. The model is an untrained GPT of the given depth
(speed does not depend on the weights) with the tiny preset's vocabulary size.
"""

from __future__ import annotations

import argparse
import time

import torch

from nanochat_core.model.gpt import GPTConfig, build_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from nanochat_core.engine import Engine
    from nanochat_core.sandbox import calculate
    from nanochat_core.tokenizer import Tokenizer

    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 50], vocab_size=512)
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(a.depth, tok.vocab_size, a.prompt + a.new, 64, 64), "cpu").eval()
    engine = Engine(model, tok, tool=None)
    engine.stop_ids = set()  # decode exactly --new tokens in every variant
    prompt = torch.randint(0, 256, (a.prompt,)).tolist()

    t = time.perf_counter()
    engine.generate_batch(prompt, 1, max_tokens=a.new, temperature=0.0)
    cached = time.perf_counter() - t

    t = time.perf_counter()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(a.new):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    uncached = time.perf_counter() - t

    t = time.perf_counter()
    engine.generate_batch(prompt, a.samples, max_tokens=a.new, temperature=1.0)
    batched = time.perf_counter() - t
    separate = cached * a.samples  # k independent batch-1 runs cost k times one run

    t = time.perf_counter()
    for i in range(a.calls):
        calculate(f"{i}*37+5")
    sandboxed = (time.perf_counter() - t) / a.calls
    t = time.perf_counter()
    for i in range(a.calls):
        eval(f"{i}*37+5")  # the reference: the in-process eval the reference implementation used
    in_process = (time.perf_counter() - t) / a.calls

    print(f"depth {a.depth}, prompt {a.prompt}, {a.new} new tokens, {a.threads} thread(s)")
    print(f"uncached decode   {a.new / uncached:8.1f} tok/s")
    print(f"KV-cache decode   {a.new / cached:8.1f} tok/s   ratio {uncached / cached:.1f}x")
    print(f"{a.samples} samples, one prefill {a.samples * a.new / batched:8.1f} tok/s   "
          f"ratio vs {a.samples} separate runs {separate / batched:.1f}x")
    print(f"calculator: sandboxed {sandboxed * 1000:.1f} ms/call, in-process {in_process * 1e6:.1f} us/call "
          f"(ratio {sandboxed / in_process:.0f}x)")


if __name__ == "__main__":
    main()
