"""scripts/rehearse.sh end to end: the production path (Prefect server and workers, MLflow server, S3,
2 processes per torch stage) with a node killed mid-pretraining, every check passing."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_rehearsal_passes_every_check():
    out = subprocess.run(["bash", "scripts/rehearse.sh"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    print(out.stdout)
    lines = out.stdout.strip().splitlines()
    assert lines and re.fullmatch(r"rehearsal: \d+ passed, 0 failed in \d+ s", lines[-1]), out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0
    assert any(re.match(r"ok   base_train resumed from step \d+", line) for line in lines)
