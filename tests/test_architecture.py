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


@pytest.mark.parametrize("statement", ["import nanochat_core.config", "import nanochat_core.presets", "import flows"])
def test_configs_and_flows_never_import_torch(statement):
    assert "torch" not in imported_after(statement)


def test_cli_help_imports_neither_prefect_nor_torch():
    modules = imported_after("from nanochat_core.cli import usage; usage()")
    assert not {"prefect", "torch"} & modules
