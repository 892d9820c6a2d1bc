"""The layering STYLE.md promises: the library never imports Prefect; configs and flows never import torch."""

import subprocess
import sys

import pytest


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


@pytest.mark.parametrize(
    "statement",
    ["import nanochat_core", "import nanochat_core.config", "import nanochat_core.presets", "import nanochat_core.plan"],
)
def test_library_never_imports_prefect(statement):
    assert "prefect" not in imported_after(statement)


def test_every_library_module_is_prefect_free():
    import pkgutil

    import nanochat_core

    names = [m.name for m in pkgutil.walk_packages(nanochat_core.__path__, "nanochat_core.")]
    assert "prefect" not in imported_after("; ".join(f"import {n}" for n in names))


@pytest.mark.parametrize("statement", ["import nanochat_core.config", "import nanochat_core.presets", "import nanochat_core.plan",
                                       "import flows.nanochat", "import flows.speedrun", "import flows.automations"])
def test_configs_and_flows_never_import_torch(statement):
    assert "torch" not in imported_after(statement)


def test_cli_help_imports_neither_prefect_nor_torch():
    modules = imported_after("from nanochat_core.cli import usage; usage()")
    assert not {"prefect", "torch"} & modules


def test_no_library_module_imports_a_stage_module():
    """Stages sit at the top: the library below them never imports one (the CLI dispatches by name)."""
    import ast
    from pathlib import Path

    import nanochat_core

    root = Path(nanochat_core.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.parent.name == "stages":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module
                     else [])
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith("nanochat_core.stages")]
    assert not offenders


def test_the_stage_registry_imports_nothing_heavy():
    modules = imported_after("import nanochat_core.registry, nanochat_core.paths")
    assert not {"torch", "prefect", "pydantic"} & {m.split(".")[0] for m in modules}
