"""A stage's cache key covers the sources that stage runs and nothing else: editing serve/ leaves a cached
pretraining Cached, editing the model invalidates it. Checked in a temporary copy of the sources."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fingerprints(tree: Path) -> dict[str, str]:
    code = ("import json; from flows.cache import code_fingerprint; from nanochat_core.registry import STAGES; "
            "import sys; print(json.dumps({s: code_fingerprint(s) for s in STAGES})); "
            "assert 'torch' not in sys.modules and sys.modules['nanochat_core'].__file__.startswith(sys.argv[1])")
    out = subprocess.run([sys.executable, "-c", code, str(tree)], cwd=tree, env={"PYTHONPATH": str(tree), "PREFECT_HOME": str(tree / ".prefect")},
                         capture_output=True, text=True, check=True)
    import json

    return json.loads(out.stdout)


def test_editing_code_a_stage_does_not_run_leaves_its_key(tmp_path):
    tree = tmp_path / "src"
    for package in ("nanochat_core", "flows"):
        shutil.copytree(REPO / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = fingerprints(tree)
    with open(tree / "nanochat_core" / "serve" / "app.py", "a") as f:
        f.write("\n# an edit to the server\n")
    with open(tree / "nanochat_core" / "stages" / "report.py", "a") as f:
        f.write("\n# an edit to the report\n")
    after_serve = fingerprints(tree)
    assert after_serve["base_train"] == before["base_train"] and after_serve["mid_train"] == before["mid_train"]
    assert after_serve["report"] != before["report"]
    with open(tree / "nanochat_core" / "model" / "gpt.py", "a") as f:  # imported by base_train (lazily)
        f.write("\n# an edit to the model\n")
    after_model = fingerprints(tree)
    assert after_model["base_train"] != before["base_train"] and after_model["chat_sft"] != before["chat_sft"]
    assert after_model["tok_train"] == before["tok_train"] and after_model["download"] == before["download"]
