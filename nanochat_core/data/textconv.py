"""Packaged formats to plain text: HTML, OSIS (SWORD modules), dictd, R data files, Gutenberg texts.

Every converter takes bytes or text as shipped and returns plain text a language model should see:
markup and navigation removed, paragraphs kept as blank-line separated blocks. `split_document` and
`pack` then shape the text into documents of web-page size, the unit the loader and tokenizer expect.
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from html.parser import HTMLParser
from typing import Iterable, Iterator

# Documents of a few thousand characters, like the web pages FineWeb-Edu holds; the tokenizer trainer
# crops documents at 10,000 characters, so nothing longer would be seen whole anyway.
MAX_DOC_CHARS = 8_000


# --- shaping ----------------------------------------------------------------------------------


def clean(text: str) -> str:
    """Normalise newlines, strip trailing spaces, collapse runs of blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def split_document(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Split a long text at paragraph (then line) boundaries into pieces of at most `max_chars`."""
    text = clean(text)
    if len(text) <= max_chars:
        return [text] if text else []
    pieces: list[str] = []
    current = ""
    for para in _units(text, max_chars):
        if current and len(current) + 2 + len(para) > max_chars:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        pieces.append(current)
    return pieces


def _units(text: str, max_chars: int) -> Iterator[str]:
    """Paragraphs, with any paragraph longer than `max_chars` cut at lines, then at spaces."""
    for para in text.split("\n\n"):
        if len(para) <= max_chars:
            yield para
            continue
        line_block = ""
        for line in para.split("\n"):
            while len(line) > max_chars:
                cut = line.rfind(" ", 0, max_chars + 1)
                cut = cut if cut > 0 else max_chars  # one very long word: cut it hard
                yield line[:cut]
                line = line[cut:].lstrip(" ")
            if line_block and len(line_block) + 1 + len(line) > max_chars:
                yield line_block
                line_block = ""
            line_block = f"{line_block}\n{line}" if line_block else line
        if line_block:
            yield line_block


def pack(items: Iterable[str], target_chars: int = 3_000, sep: str = "\n\n") -> Iterator[str]:
    """Join many short items (dictionary entries, fortunes, glosses) into documents of ~target_chars."""
    batch: list[str] = []
    size = 0
    for item in items:
        item = item.strip()
        if not item:
            continue
        batch.append(item)
        size += len(item) + len(sep)
        if size >= target_chars:
            yield from split_document(sep.join(batch))
            batch, size = [], 0
    if batch:
        yield from split_document(sep.join(batch))


# --- Project Gutenberg ------------------------------------------------------------------------

_GUT_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUT_END = re.compile(r"^(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """The book without Project Gutenberg's license header and footer (kept when markers are absent)."""
    start = _GUT_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUT_END.search(text)
    if end:
        text = text[: end.start()]
    return text


# --- HTML -------------------------------------------------------------------------------------

_BLOCK_TAGS = {
    "p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "pre", "blockquote",
    "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "header", "footer", "hr", "figure",
}
_SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "button", "svg", "template"}
_SKIP_CLASSES = {"navheader", "navfooter", "sidebar", "nav-chapters", "nav-wrapper", "menu-bar"}
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source"}


class _TextExtractor(HTMLParser):
    """Visible text of an HTML page; navigation (by tag or by class) is dropped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, starts a skipped subtree)
        self.skipping = 0
        self.pre = 0
        self.line_start = True

    def newline(self, text: str) -> None:
        # Spaces next to a line break come from collapsed source whitespace: drop them.
        if self.parts and not self.pre:
            self.parts[-1] = self.parts[-1].rstrip(" ")
        self.parts.append(text)
        self.line_start = True

    def handle_starttag(self, tag, attrs):
        classes = set((dict(attrs).get("class") or "").split())
        skip = tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES)
        if tag in _VOID_TAGS:
            if tag in _BLOCK_TAGS and not self.skipping:
                self.newline("\n")
            return
        self.stack.append((tag, skip))
        self.skipping += skip
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK_TAGS and not self.skipping:
            self.newline("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4") else "\n")
        elif tag in ("td", "th") and not self.skipping:
            self.parts.append(" ")  # table cells would otherwise run together

    def handle_endtag(self, tag):
        # Pop to the matching open tag; stray end tags (common in real pages) are ignored.
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                for t, skip in self.stack[i:]:
                    self.skipping -= skip
                    if t == "pre":
                        self.pre -= 1
                del self.stack[i:]
                break
        if tag in _BLOCK_TAGS and not self.skipping:
            self.newline("\n")

    def handle_data(self, data):
        if self.skipping:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if self.line_start:
                data = data.lstrip(" ")
        if data:
            self.parts.append(data)
            self.line_start = False


def html_to_text(page: str) -> str:
    m = re.search(r"<main\b[^>]*>(.*)</main>", page, re.S | re.I)
    if m:  # mdBook / modern pages: the article is <main>; the rest is chrome
        page = m.group(1)
    parser = _TextExtractor()
    parser.feed(page)
    parser.close()
    return clean("".join(parser.parts))


# --- OSIS (SWORD modules) ---------------------------------------------------------------------


def osis_to_text(markup: str) -> str:
    """Plain text of OSIS/ThML markup: notes dropped, titles and paragraphs on their own lines."""
    markup = re.sub(r"<note\b[^>]*/>", "", markup)
    markup = re.sub(r"<note\b.*?</note>", "", markup, flags=re.S)
    markup = re.sub(r"<(title|/title|lb|p|/p|l|/l|br)\b[^>]*>", "\n", markup)
    markup = re.sub(r'<div\b[^>]*type="(x-p|paragraph)"[^>]*/?>', "\n\n", markup)
    markup = re.sub(r"<[^>]+>", "", markup)
    text = html.unescape(markup)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    return clean(text)


def sword_blocks(index: bytes, data: bytes, verses: bytes, entry_size: int) -> Iterator[list[bytes]]:
    """Entries of a compressed SWORD module (zText/zCom), grouped by compressed block.

    Layout: `*.?zs` holds (offset, size, uncompressed size) per zlib block of `*.?zz`; `*.?zv` holds
    one (block, offset, size) entry per verse, with a 16-bit size (entry_size 10) or a 32-bit one
    (entry_size 12, the "4" drivers). Linked verses repeat an entry; each is returned once.
    """
    fmt = "<IIH" if entry_size == 10 else "<III"
    by_block: dict[int, list[tuple[int, int]]] = {}
    seen: set[tuple[int, int]] = set()
    for i in range(0, len(verses) - entry_size + 1, entry_size):
        block, offset, size = struct.unpack(fmt, verses[i : i + entry_size])
        if size and (block, offset) not in seen:
            seen.add((block, offset))
            by_block.setdefault(block, []).append((offset, size))
    for block in sorted(by_block):
        start, csize, _ = struct.unpack("<III", index[block * 12 : block * 12 + 12])
        raw = zlib.decompress(data[start : start + csize])
        yield [raw[o : o + n] for o, n in sorted(by_block[block])]


# --- dictd ------------------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64_number(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def dictd_entries(dict_data: bytes, index_text: str) -> Iterator[str]:
    """Entries of a dictd database (`.dict` uncompressed, `.index` text), in index order, deduplicated.

    Index lines are `headword<TAB>offset<TAB>length` with dictd's base-64 numbers; `00-database-*`
    lines are metadata, not entries.
    """
    seen: set[int] = set()
    for line in index_text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        offset, length = _b64_number(parts[1]), _b64_number(parts[2])
        if offset in seen:
            continue
        seen.add(offset)
        yield dict_data[offset : offset + length].decode("utf-8", errors="replace")


# --- R lazy-load databases --------------------------------------------------------------------


def r_character_vectors(rdb: bytes) -> Iterator[list[str]]:
    """Every character vector stored in an R lazy-load database (`*.rdb`), in file order.

    An `.rdb` is a sequence of objects, each a 4-byte big-endian length followed by a zlib stream of
    R's XDR serialization. Only top-level character vectors (STRSXP) are decoded; other objects
    (data frames, functions) are skipped.
    """
    rest = rdb
    while len(rest) > 4:
        stream = zlib.decompressobj()
        payload = stream.decompress(rest[4:])
        rest = stream.unused_data
        vector = _r_strsxp(payload)
        if vector is not None:
            yield vector


def _r_strsxp(payload: bytes) -> list[str] | None:
    if payload[:2] != b"X\n":
        return None
    pos = 2
    version = struct.unpack(">i", payload[pos : pos + 4])[0]
    pos += 12  # version, writer version, minimal reader version
    if version == 3:
        nelen = struct.unpack(">i", payload[pos : pos + 4])[0]
        pos += 4 + nelen  # native encoding name
    flags = struct.unpack(">i", payload[pos : pos + 4])[0]
    pos += 4
    if flags & 0xFF != 16:  # STRSXP
        return None
    length = struct.unpack(">i", payload[pos : pos + 4])[0]
    pos += 4
    out = []
    for _ in range(length):
        pos += 4  # CHARSXP flags (encoding bits)
        n = struct.unpack(">i", payload[pos : pos + 4])[0]
        pos += 4
        if n < 0:  # NA_character_
            out.append("")
            continue
        out.append(payload[pos : pos + n].decode("utf-8", errors="replace"))
        pos += n
    return out
