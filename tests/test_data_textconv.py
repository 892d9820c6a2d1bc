"""Converters from packaged formats to plain text, checked on small inputs built here byte by byte."""

from __future__ import annotations

import struct
import zlib

from nanochat_core.data import textconv as tc


def test_split_document_respects_the_cap_and_keeps_every_word():
    paras = [f"paragraph {i} " + "word " * (i * 37 % 400) for i in range(200)]
    text = "\n\n".join(p.strip() for p in paras)
    pieces = tc.split_document(text, max_chars=1_000)
    assert all(0 < len(p) <= 1_000 for p in pieces)
    assert " ".join(pieces).split() == text.split()
    assert tc.split_document("x" * 2_500, max_chars=1_000) == ["x" * 1_000, "x" * 1_000, "x" * 500]
    assert tc.split_document("  \n\n ") == []


def test_pack_groups_short_items():
    items = [f"fortune {i}" for i in range(100)]
    docs = list(tc.pack(items, target_chars=100))
    assert all(len(d) < 200 for d in docs) and len(docs) > 5
    assert "\n\n".join(docs).split("\n\n") == items


def test_strip_gutenberg():
    book = "The Project Gutenberg eBook\nlicense...\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nCall me.\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore license"
    assert tc.strip_gutenberg(book).strip() == "Call me."
    assert tc.strip_gutenberg("plain text") == "plain text"


def test_html_to_text_drops_chrome_and_keeps_content():
    page = """<html><head><title>T</title><style>p{}</style></head><body>
    <div class="navheader"><a href="x">Prev</a> Next</div>
    <script>var x = 1;</script><h1>SELECT</h1><p>Retrieve rows&nbsp;from a <b>table</b>.</p>
    <pre>SELECT *
  FROM t;</pre><table><tr><td>a</td><td>b</td></tr></table>
    <div class="navfooter">Home</div></body></html>"""
    text = tc.html_to_text(page)
    assert "Prev" not in text and "Home" not in text and "var x" not in text and "p{}" not in text
    assert "SELECT\n\nRetrieve rows from a table." in text
    assert "SELECT *\n  FROM t;" in text  # <pre> keeps its layout
    assert "a b" in text
    assert tc.html_to_text("<body><nav>menu</nav><main><p>only this</p></main></body>") == "only this"


def test_osis_to_text():
    markup = ('<title type="x-s">Psalm 4</title> <div sID="g1" type="x-p"/>Hear me<note type="x-study">'
              'a note</note> when I call, <hi type="italic">O God</hi> &amp; more.')
    assert tc.osis_to_text(markup) == "Psalm 4\n\nHear me when I call, O God & more."


def test_sword_blocks_reads_verses_by_index():
    blocks = [b"In the beginning.And the earth.", b"Second block verse."]
    data, index = b"", b""
    for raw in blocks:
        z = zlib.compress(raw)
        index += struct.pack("<III", len(data), len(z), len(raw))
        data += z
    for entry_size, fmt in ((10, "<IIH"), (12, "<III")):
        verses = b"".join(struct.pack(fmt, *v) for v in [(0, 0, 0), (0, 0, 17), (0, 17, 14), (0, 17, 14), (1, 0, 19)])
        got = list(tc.sword_blocks(index, data, verses, entry_size))
        assert got == [[b"In the beginning.", b"And the earth."], [b"Second block verse."]]


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = tc._B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def test_dictd_entries():
    entries = ["00-database-info\nabout", "ABACUS, n. An instrument.", "ABDICATION, n. An act."]
    data = "".join(entries).encode()
    lines, offset = [], 0
    for headword, e in zip(["00-database-info", "abacus", "abdication"], entries):
        lines.append(f"{headword}\t{_b64(offset)}\t{_b64(len(e.encode()))}")
        offset += len(e.encode())
    lines.append(lines[1].replace("abacus", "abaci"))  # a second headword for the same entry
    assert list(tc.dictd_entries(data, "\n".join(lines))) == entries[1:]


def _xdr_strsxp(strings: list[str | None]) -> bytes:
    out = b"X\n" + struct.pack(">iii", 3, 0x040200, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(strings))
    for s in strings:
        if s is None:
            out += struct.pack(">ii", 9, -1)
        else:
            raw = s.encode()
            out += struct.pack(">ii", 0x00040009, len(raw)) + raw
    return out


def test_r_character_vectors():
    objects = [
        _xdr_strsxp(["EMMA", "", "Emma Woodhouse, handsome,", None]),
        b"X\n" + struct.pack(">iii", 2, 0, 0) + struct.pack(">ii", 13, 1) + struct.pack(">i", 7),  # an integer
        _xdr_strsxp(["PERSUASION"]),
    ]
    rdb = b"".join(struct.pack(">I", len(o)) + zlib.compress(o) for o in objects)
    assert list(tc.r_character_vectors(rdb)) == [["EMMA", "", "Emma Woodhouse, handsome,", ""], ["PERSUASION"]]
