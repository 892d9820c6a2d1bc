"""Checkpoint on notice: base_train under a real torchrun (2 CPU processes, gloo) sent SIGTERM mid-run
saves the step it was in, records the stop, leaves no rank alive, and a re-run continues with the losses
of an uninterrupted run; the launcher's torchrun flags and the CLI's torchrun for --nproc-per-node 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from nanochat_core import checkpoint, launch, notice
from nanochat_core.stages import base_train
from pretrain_data import make_pretraining_inputs
from test_base_train import config, metrics
from conftest import run_alone

STEPS = 16


def _cfg(base):
    # save_every 5: a periodic checkpoint measures the write rate before the notice comes (mostly)
    return config(base, nproc_per_node=2, num_iterations=STEPS, eval_every=3, save_every=5, keep_last=5)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("notice")
    make_pretraining_inputs(str(path))
    return path


@pytest.fixture
def env(base, monkeypatch):
    for name, value in {"NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NANOCHAT_INPUTS_PATH", raising=False)
    yield
    launch._stopping.clear()  # stop_all stops this process's launcher for good; the next test starts anew


@pytest.fixture(scope="module")
def straight(base):
    """The uninterrupted run's metric rows (time fields dropped)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    try:
        cfg = _cfg(base)
        cfg = cfg.model_copy(update={"base_train": cfg.base_train.model_copy(update={"out": str(base / "straight")})})
        launch.run_stage("base_train", cfg, lambda line: None, nproc_per_node=2, inputs=_inputs(base))
    finally:
        os.environ.pop("NANOCHAT_BASE_DIR") if old is None else os.environ.update(NANOCHAT_BASE_DIR=old)
    return _rows(base / "straight")


def _inputs(base):
    from nanochat_core.stage_args import ref_at

    return {"tokenizer": ref_at(str(base / "tokenizer")), "shards": ref_at(str(base / "base_data"))}


def _rows(ckpt) -> list[dict]:
    return [{k: v for k, v in r.items() if k in ("step", "train/loss", "val/bpb", "train/lr_mult")}
            for r in metrics(ckpt / "metrics.jsonl")]


def _start(base, out: str, lines: list[str]):
    """run_stage in a thread; returns (thread, box) where box gets the ref or the exception."""
    cfg = _cfg(base)
    cfg = cfg.model_copy(update={"base_train": cfg.base_train.model_copy(update={"out": out})})
    box: dict = {}

    def target():
        try:
            box["ref"] = launch.run_stage("base_train", cfg, lines.append, nproc_per_node=2, inputs=_inputs(base))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box, cfg


def _wait_for_step(ckpt, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    path = ckpt / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and any(r.get("step", 0) >= step and "train/loss" in r for r in metrics(path)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s")


def _ranks(torchrun_pid: int) -> set[tuple[int, str]]:
    """(PID, start time) of the rank processes below torchrun (by their command line)."""
    ranks = set()
    for pid, start in launch.descendants(torchrun_pid):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"nanochat_core.stages.base_train" in cmdline and b"torch.distributed.run" not in cmdline:
            ranks.add((pid, start))
    return ranks


def _alive(procs: set[tuple[int, str]]) -> set[int]:
    return {pid for pid, start in procs if launch._start_time(pid) == start}


def _running_torchrun():
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with launch._lock:
            procs = list(launch._running)
        if procs:
            return procs[0]
        time.sleep(0.05)
    raise AssertionError("torchrun did not start")


def _continue_and_compare(base, cfg, ckpt, stopped_at: int, straight: list[dict]) -> None:
    """The re-run continues from the stop step and logs exactly what the uninterrupted run logged."""
    lines: list[str] = []
    ref = launch.run_stage("base_train", cfg, lines.append, nproc_per_node=2, inputs=_inputs(base))
    assert ref["resumed_from"] == stopped_at and ref["step"] == STEPS
    assert any(f"resumed from step {stopped_at} " in line for line in lines)
    assert _rows(ckpt) == straight  # 0 steps lost: same losses, same val bpb, step for step


@pytest.mark.slow
@pytest.mark.parametrize("skew", [0.0, 1.0], ids=["together", "one-rank-1s-early"])
def test_sigterm_to_the_ranks_saves_the_step_and_a_rerun_loses_nothing(base, env, straight, skew):
    ckpt = base / f"ranks-{skew}"
    lines: list[str] = []
    thread, box, cfg = _start(base, str(ckpt), lines)
    torchrun = _running_torchrun()
    _wait_for_step(ckpt, 2)
    ranks = _ranks(torchrun.pid)
    assert len(ranks) == 2
    # As torchrun forwards it: SIGTERM to each rank's own process group (each rank has a session of its own).
    for i, (pid, _) in enumerate(sorted(ranks)):
        if i and skew:
            time.sleep(skew)
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # already saved and gone: the other rank's notice stopped them both
    thread.join(timeout=launch.stop_grace() + 60)
    assert not thread.is_alive()
    err = box.get("error")
    assert isinstance(err, launch.StagePreempted), (box, lines[-30:])
    step = err.stopped_at_step
    assert 2 <= step < STEPS
    assert str(err) == f"base_train stopped on SIGTERM at step {step} and saved a checkpoint there; a re-run continues from it"
    assert checkpoint.latest_step(str(ckpt)) == step
    assert checkpoint.read_meta(str(ckpt), step)["stopped_at_step"] == step
    assert {f"optim_{step:06d}_rank0.pt", f"optim_{step:06d}_rank1.pt"} <= set(os.listdir(ckpt))
    assert not (ckpt / "result.json").exists()  # the stage did not finish: no ref for a cache to trust
    assert not _alive(ranks)
    _continue_and_compare(base, cfg, ckpt, step, straight)


@pytest.mark.slow
def test_stop_all_reaches_the_ranks_through_torchrun_and_none_survives(base, env, straight):
    ckpt = base / "stop_all"
    lines: list[str] = []
    thread, box, cfg = _start(base, str(ckpt), lines)
    torchrun = _running_torchrun()
    _wait_for_step(ckpt, 2)
    below = launch.descendants(torchrun.pid)
    assert len(_ranks(torchrun.pid)) == 2
    t0 = time.monotonic()
    launch.stop_all()  # SIGTERM to torchrun's group; torchrun forwards it to the ranks' own sessions
    thread.join(timeout=60)
    assert time.monotonic() - t0 < launch.stop_grace()
    err = box.get("error")
    assert isinstance(err, launch.StageStopped) and err.stopped_at_step is not None, (box, lines[-30:])
    step = err.stopped_at_step
    assert f"base_train stopped on SIGTERM at step {step} and saved a checkpoint there" in str(err)
    assert checkpoint.read_meta(str(ckpt), step)["stopped_at_step"] == step
    assert torchrun.poll() is not None and not _alive(below)  # torchrun, its ranks and anything below them
    launch._stopping.clear()
    _continue_and_compare(base, cfg, ckpt, step, straight)


@pytest.mark.slow
def test_the_cli_starts_torchrun_for_two_processes_and_passes_sigterm_on(base, env, tmp_path):
    ckpt = tmp_path / "ckpt"
    cfg = config(base, nproc_per_node=2, num_iterations=STEPS, eval_every=-1, save_every=-1, out=str(ckpt))
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.model_dump_json())
    argv = [sys.executable, "-m", "nanochat_core.cli", "base-train", "--config", str(cfg_file)]
    run_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = subprocess.Popen(argv, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    below = set()
    try:
        _wait_for_step(ckpt, 2)
        below, ranks = launch.descendants(cli.pid), _ranks(cli.pid)
        assert len(ranks) == 2  # torchrun's two ranks below the command
        cli.send_signal(signal.SIGTERM)  # what a shell's `kill` or a container stop sends the command
        out, err = cli.communicate(timeout=launch.stop_grace() + 60)
    finally:  # whatever failed, leave nothing running (by PID)
        for pid in _alive(below) | ({cli.pid} if cli.poll() is None else set()):
            os.kill(pid, signal.SIGKILL)
    assert "-m torch.distributed.run --nproc_per_node=2" in out
    assert cli.returncode == notice.EXIT_STATUS, out[-2000:] + err[-2000:]
    step = checkpoint.latest_step(str(ckpt))
    assert f"error: base_train stopped on SIGTERM at step {step} and saved a checkpoint there" in err
    assert "Traceback" not in err.split("error: base_train stopped")[-1]
    assert not _alive(ranks)

    done = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"resumed from step {step} " in done.stdout
    assert checkpoint.read_meta(str(ckpt), STEPS)["world_size"] == 2


def test_mid_train_stops_on_notice_and_continues_exactly(monkeypatch, tmp_path, capsys):
    """mid_train and chat_sft share the loop: in-process, one process, the notice here before step 1."""
    from test_chat_stages import make_base, small_config
    from nanochat_core.stages import mid_train

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("NANOCHAT_INPUTS_PATH", raising=False)
    make_base(str(tmp_path))
    cfg = small_config()

    def with_out(name: str):
        return cfg.model_copy(update={"mid_train": cfg.mid_train.model_copy(
            update={"out": str(tmp_path / name), "num_iterations": 4, "eval_every": 1})})

    run_alone(mid_train, with_out("straight"))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        notice.install()
        os.kill(os.getpid(), signal.SIGTERM)
        record = run_alone(mid_train, with_out("stopped"))
    finally:
        signal.signal(signal.SIGTERM, previous)
        notice._received_at = None
    assert record == {"stage": "mid_train", "path": str(tmp_path / "stopped"), "stopped_at_step": 1,
                      "signal": "SIGTERM", "checkpoint_step": 1}
    assert checkpoint.read_meta(str(tmp_path / "stopped"), 1)["stopped_at_step"] == 1
    continued = run_alone(mid_train, with_out("stopped"))
    assert continued["resumed_from"] == 1 and continued["step"] == 4

    def rows(name):
        return [{k: v for k, v in r.items() if k in ("step", "train/loss", "val/loss")}
                for r in metrics(tmp_path / name / "metrics.jsonl")]

    assert rows("stopped") == rows("straight")  # the skipped evaluation of step 1 made up on the re-run


def test_torchrun_gets_the_notice_and_stop_all_waits_longer(monkeypatch):
    monkeypatch.setenv("NANOCHAT_NOTICE_S", "120")  # AWS's two minutes
    argv = launch.command("base_train", "c.json", nproc_per_node=2)
    assert f"--shutdown-timeout={launch.shutdown_timeout()}" in argv and launch.shutdown_timeout() >= 120
    assert launch.stop_grace() > launch.shutdown_timeout()
    assert "--shutdown-timeout" not in " ".join(launch.command("base_train", "c.json"))  # one process: no torchrun


def test_a_write_that_cannot_finish_in_the_notice_is_not_started(base, monkeypatch, capsys):
    """One process, in this one: the notice is already here when training starts, and the recorded write
    rate makes even this tiny checkpoint too slow for a 1 s notice."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.delenv("NANOCHAT_INPUTS_PATH", raising=False)
    monkeypatch.setenv("NANOCHAT_NOTICE_S", "1")
    monkeypatch.setenv("NANOCHAT_CHECKPOINT_GBPS", "1e-9")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        notice.install()
        os.kill(os.getpid(), signal.SIGTERM)
        cfg = config(base, out=str(base / "too_slow"), save_every=-1)
        record = run_alone(base_train, cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)
        notice._received_at = None
    assert record["stopped_at_step"] == 1 and record["checkpoint_step"] is None
    out = capsys.readouterr().out
    assert "not starting it: no checkpoint exists, a re-run starts over" in out
    assert "base_train stopped on SIGTERM at step 1 without saving" in out
    assert checkpoint.latest_step(str(base / "too_slow")) is None


def test_a_bad_notice_setting_is_one_sentence(monkeypatch):
    monkeypatch.setenv("NANOCHAT_NOTICE_S", "soon")
    with pytest.raises(notice.UserError, match="NANOCHAT_NOTICE_S='soon' is not a positive number of seconds"):
        notice.install()
