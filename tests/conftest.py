"""Shared pytest setup: every test gets its own NANOCHAT_BASE_DIR, so nothing touches ~/.cache."""

import pytest


@pytest.fixture(autouse=True)
def _isolated_base_dir(tmp_path_factory, monkeypatch):
    base = tmp_path_factory.mktemp("base")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base
