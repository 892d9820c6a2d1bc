"""The checks of scripts/rehearse_docker.sh, run on the host against the stack it brought up. Everything
reaches the stack through `docker exec` (nothing is published on the host); what needs Prefect, MLflow or
S3 runs in the mlflow container (never killed) as scripts/rehearse_docker_probe.py, and every pipeline
starts as a user starts it, `prefect deployment run nanochat/smoke --param cfg=...`.

1. uninterrupted: the tiny preset end to end (every torch stage torchrun --nproc_per_node=2, gloo) on
   whichever worker takes it, artifacts on the stack's S3, MLflow parent and children on PostgreSQL.
2. killed: the same with base_train writing to a checkpoint directory of its own; once a checkpoint is on
   S3, `docker kill` of the worker container running it; the heartbeat automation (flows/automations.py)
   marks the run Crashed and the recovery automation puts it back in the pool, without a command: the
   other worker runs its next attempt, which finds the upstream stages Cached and continues base_train
   from the checkpoint. Its losses must equal run 1's base_train, step for step.
3. partition: the same with `docker network disconnect` instead (the worker alive but unreachable):
   detection time, takeover by the other worker, then `docker network connect`: the cut-off worker must
   not write into the checkpoint directory after the takeover, and the checkpoints must all load.
Runs 2 and 3 skip every stage the flow lets a run skip (tok_eval, eval_bundle, base_eval, chat_rl,
chat_eval, report); mid_train and chat_sft cannot be skipped and run after base_train.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROBE = (HERE / "rehearse_docker_probe.py").read_text()
PROJECT = os.environ.get("REHEARSAL_PROJECT", "nanochat-rehearsal")
COUNTS = Path(os.environ["REHEARSAL_COUNTS"])
LOGS = Path(os.environ["REHEARSAL_LOGS"])
NETWORK = "nanochat-rehearsal"
BASE = "s3://nanochat/base"
SAVE_EVERY = 15  # tiny's base_train is 60 steps: checkpoints at 15, 30, 45 and 60
STEPS = 60
SKIP = ["tok_eval", "eval_bundle", "base_eval", "chat_rl", "chat_eval", "report"]
IN_STACK = {"PREFECT_API_URL": "http://prefect-server:4200/api", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}


def cfg(out: str | None = None) -> dict:
    base_train = {"save_every": SAVE_EVERY, **({"out": out} if out else {})}
    return {"preset": "tiny", "devices_per_node": 2, "base_train": base_train}


def check(ok: bool, what: str, detail: str = "") -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)
    with COUNTS.open("a") as f:
        f.write("ok\n" if ok else "FAIL\n")
    return ok


def docker(*args: str, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, input=input)


def container(service: str) -> str:
    out = docker("ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
                 "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}")
    return out.stdout.split()[0]


def probe(*args: str, timeout: float = 600):
    env = [a for k, v in IN_STACK.items() for a in ("-e", f"{k}={v}")]
    out = docker("exec", "-i", *env, container("mlflow"), "python", "-", *args, timeout=timeout, input=PROBE)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")), None)
    if line is None:
        raise RuntimeError(f"probe {args[0]} printed nothing: {(out.stderr or out.stdout)[-800:]}")
    value = json.loads(line[6:])
    if isinstance(value, dict) and "error" in value:
        raise RuntimeError(f"probe {args[0]}: {value['error']}")
    return value


def deployment_run(c: dict, skip: list[str], name: str) -> str:
    """`prefect deployment run`, as a user types it, from a container on the stack's network."""
    args = ["deployment", "run", "nanochat/smoke", "--param", f"cfg={json.dumps(c)}"]
    if skip:
        args += ["--param", f"skip={json.dumps(skip)}"]
    out = docker("exec", "-e", f"PREFECT_API_URL={IN_STACK['PREFECT_API_URL']}", container("mlflow"), "prefect", *args)
    (LOGS / f"deployment-run-{name}.log").write_text(out.stdout + out.stderr)
    found = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout)
    if out.returncode or not found:
        raise RuntimeError(f"prefect deployment run failed: {(out.stderr or out.stdout)[-800:]}")
    return found.group(1)


def host_of(hosts: dict[str, str], exclude: str | None = None, timeout: float = 300) -> str:
    """The worker (hostname) whose container runs a flow run now: one with a `prefect.engine` process (the
    process worker's child for a flow run). The rehearsal runs one flow run at a time, so that is the run
    just started; `exclude` leaves out a cut-off worker whose old flow run may still be alive."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for host, name in hosts.items():
            if host != exclude and processes(name, FLOW_RUN):
                return host
        time.sleep(1)
    raise RuntimeError(f"no worker took the flow run within {timeout:.0f} s")


FLOW_RUN = ("prefect.engine",)  # the process worker's child for a flow run
STAGE = ("nanochat_core.stages", "torchrun")


def processes(name: str, marks: tuple[str, ...]) -> list[str]:
    """The processes of a container (its process table, seen from the host) whose command line holds one
    of `marks`."""
    out = docker("top", name, "-eo", "pid,args")
    return [ln for ln in out.stdout.splitlines() if any(m in ln for m in marks)]


def stage_processes(name: str) -> list[str]:
    """The torchrun / stage processes running in a container."""
    return processes(name, STAGE)


def save_logs() -> None:
    for service in ("worker", "worker-2"):
        try:
            out = docker("logs", "--timestamps", container(service))
            (LOGS / f"{service}.log").write_text(out.stdout + out.stderr)
        except (IndexError, subprocess.SubprocessError):
            pass


def main() -> int:
    hosts = {"worker-1": container("worker"), "worker-2": container("worker-2")}  # hostname -> container
    try:
        out = docker("exec", container("worker"), "python", "-m", "flows.automations")
        check(out.returncode == 0, "heartbeat and recovery automations created (python -m flows.automations)",
              (out.stdout or out.stderr).strip()[-200:])
        reference = uninterrupted(hosts)
        if reference:
            killed(hosts, reference)
            partition(hosts, reference)
    except Exception as e:  # a step that could not even run is a failed check, not a traceback
        check(False, "the rehearsal's checks ran to their end", f"{type(e).__name__}: {e}")
    finally:
        save_logs()
    return 0


def uninterrupted(hosts: dict[str, str]) -> list[float] | None:
    t0 = time.time()
    run = deployment_run(cfg(), [], "uninterrupted")
    host = host_of(hosts)
    state = probe("wait-state", run, "1500", "final", timeout=1600)
    tasks = state["tasks"]
    check(state["state"] == "Completed",
               f"uninterrupted: the tiny pipeline ran through `prefect deployment run` on {host}",
               f"{state['state']} in {time.time() - t0:.0f} s, {len(tasks)} task runs"
               + ("" if state["state"] == "Completed" else f"; {state['message']}"))
    not_done = {k: v for k, v in tasks.items() if v not in ("Completed", "Cached")}
    check(not not_done, "uninterrupted: every stage Completed", json.dumps(not_done) if not_done else ", ".join(sorted(tasks)))
    ckpt = f"{BASE}/base_checkpoints/d2"
    verified = probe("verify", ckpt)
    worlds = set(verified["loaded"].values())
    check(worlds == {2}, "uninterrupted: base_train ran as torchrun --nproc_per_node=2 (gloo), checkpoints on S3",
          f"{ckpt} steps {verified['steps']}, world sizes {sorted(worlds)}")
    tracked = probe("tracking", run)
    check(tracked.get("parents") == 1 and {"base_train", "mid_train", "chat_sft"} <= set(tracked.get("children", [])),
          "uninterrupted: MLflow (on PostgreSQL, artifacts on S3) has the parent run and a child per stage",
          f"{len(tracked.get('children', []))} children; aliases {', '.join(f'@{a}' for a, s in tracked.get('aliases', {}).items() if not s.startswith('missing'))}")
    # The reference for the interrupted runs is base_train's losses, whatever happened to later stages.
    reference = probe("losses", ckpt)["losses"] if verified["steps"] else []
    return reference if len(reference) == STEPS else None


def interrupted_run(hosts: dict[str, str], name: str, out: str) -> tuple[str, str, int]:
    """Start run `name` with base_train writing to `out`; return (flow run, its worker's container, the step
    of the first checkpoint on S3) once base_train has one."""
    run = deployment_run(cfg(out), SKIP, name)
    host = host_of(hosts)
    step = probe("wait-checkpoint", out, "900", timeout=960)
    if not step:
        raise RuntimeError(f"{name}: base_train wrote no checkpoint to {out} within 900 s")
    return run, host, step


def recovered_and_compare(hosts: dict[str, str], name: str, run: str, out: str, step: int,
                          reference: list[float], gone: str) -> None:
    """The Crashed run goes back to the pool by itself (flows/automations.recovery) and its next attempt
    runs on the other worker: no command is typed."""
    t0 = time.time()
    host = host_of(hosts, exclude=gone)
    state = probe("wait-state", run, "1200", "settled", timeout=1300)
    tasks = state["tasks"]
    cached = [t for t in ("corpus", "download[:3]", "download", "tok_train") if tasks.get(t) == "Cached"]
    check(state["state"] == "Completed" and host != gone and (state.get("run_count") or 0) >= 2,
          f"{name}: the run continued without a command on the other worker, {host}",
          f"{state['state']} in {time.time() - t0:.0f} s, attempt {state.get('run_count')}; Cached: "
          f"{', '.join(cached) or 'none'}" + ("" if state["state"] == "Completed" else f"; {state['message']}"))
    got = probe("losses", out)
    same = got["losses"] == reference
    check(same and got["resumed_from"] == step,
          f"{name}: base_train continued from its step-{got['resumed_from']} checkpoint on S3 and ends with the "
          f"uninterrupted run's loss",
          f"final {got['losses'][-1:]} vs {reference[-1:]}, {len(got['losses'])} steps"
          + ("" if same else ", the losses differ"))


def killed(hosts: dict[str, str], reference: list[float]) -> None:
    out = f"{BASE}/killed/d2"
    run, host, step = interrupted_run(hosts, "killed", out)
    victim = hosts[host]
    procs = len(stage_processes(victim))
    docker("kill", victim)
    died = time.time()
    check(step < STEPS and procs > 0, f"killed: `docker kill` of {host} ({victim}) mid-base_train",
          f"checkpoint step {step} on S3, {procs} torchrun/stage processes were running there")
    crashed = probe("wait-state", run, "300", "crashed", timeout=360)
    check(crashed["reached"], "killed: Prefect marked the dead worker's run Crashed (heartbeat automation)",
          f"{crashed['state']} {time.time() - died:.0f} s after the kill")
    recovered_and_compare(hosts, "killed", run, out, step, reference, host)
    # The partition needs two workers again: the killed container starts afresh (a replaced node).
    docker("start", victim)


def partition(hosts: dict[str, str], reference: list[float]) -> None:
    out = f"{BASE}/partition/d2"
    wait_healthy(list(hosts.values()), 240)
    run, host, step = interrupted_run(hosts, "partition", out)
    victim = hosts[host]
    before = len(stage_processes(victim))
    docker("network", "disconnect", NETWORK, victim)
    cut = time.time()
    crashed = probe("wait-state", run, "300", "crashed", timeout=360)
    detected = time.time() - cut
    alive = len(stage_processes(victim))
    check(crashed["reached"], f"partition: {host} cut off (docker network disconnect) mid-base_train; run marked Crashed",
          f"detected in {detected:.0f} s (heartbeat automation); checkpoint step {step}; "
          f"{alive} of {before} torchrun/stage processes still alive there")
    recovered_and_compare(hosts, "partition", run, out, step, reference, host)
    finished = time.time()
    before_reconnect = probe("objects", out)
    docker("network", "connect", NETWORK, victim)
    quiet_s = quiet_after(victim, 60)
    after = probe("objects", out)
    late = sorted(k for k, (mtime, _) in after.items() if mtime > finished + 1)
    changed = sorted(k for k in after if k in before_reconnect and after[k] != before_reconnect[k])
    still = len(stage_processes(victim))
    check(not late and not changed,
          f"partition: {host} wrote nothing into {out} after the takeover, also after `docker network connect` "
          "(S3 is behind the same cut here; where it is not, fencing stops the cut-off attempt before a checkpoint write)",
          f"{len(late)} objects written after the next attempt finished: {', '.join(late[:6])}; "
          f"its flow run and stage processes gone {quiet_s:.0f} s after reconnecting, {still} left then")
    verified = probe("verify", out)
    got = probe("losses", out)
    check(not verified["unreadable"] and set(verified["loaded"]) and got["losses"] == reference,
          "partition: after reconnecting nothing is corrupted (every checkpoint loads, losses as uninterrupted)",
          f"steps {verified['steps']}, unreadable {verified['unreadable']}")


def quiet_after(name: str, at_most: float) -> float:
    """Seconds from now until container `name` runs neither a flow run (prefect.engine) nor a stage: what
    the cut-off worker still had queued (an S3 PUT retried, a Prefect retry of base_train) has run or was
    stopped by then; then 10 s more for a write already in flight. At most `at_most` s in all."""
    t0 = time.time()
    while time.time() - t0 < at_most - 10:
        if not processes(name, FLOW_RUN + STAGE):
            break
        time.sleep(2)
    quiet = time.time() - t0
    time.sleep(10)
    return quiet


def wait_healthy(names: list[str], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = [docker("inspect", "-f", "{{.State.Health.Status}}", n).stdout.strip() for n in names]
        if all(s == "healthy" for s in states):
            return
        time.sleep(2)
    raise RuntimeError(f"workers not healthy within {timeout:.0f} s: {dict(zip(names, states))}")


if __name__ == "__main__":
    sys.exit(main())
