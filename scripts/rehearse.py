"""The production path rehearsed on one machine: PostgreSQL, a Prefect server and process workers, an
MLflow tracking server, artifacts on S3, torchrun with 2 processes per stage, and nodes that go away.

    bash scripts/rehearse.sh            # after scripts/setup.sh; prints one line per check

On 127.0.0.1: PostgreSQL 15 (Debian's, a cluster of its own in a temporary directory, run as the
`postgres` user when this runs as root, since initdb refuses root), moto's S3 server (from a venv of its
own), `prefect server start` and `mlflow server` (both on PostgreSQL, MLflow's artifacts proxied to S3)
and process workers. The `smoke` deployment of deployments/prefect.yaml runs the tiny preset with
`devices_per_node: 2` (every torch stage is `torchrun --nproc_per_node=2`, gloo: d20's topology at toy
scale) and its base dir on S3. One run meets two preemptions and nobody types a command after the first:
1. mid-base_train, node 1 gets notice: its `prefect flow-run execute` gets SIGTERM and GRACE_S to go (its
   worker takes no more work: Stack.notice says why it is frozen rather than SIGTERMed); the run goes back
   to the pool (AwaitingRetry) and worker 2 runs attempt 2: the line says how many steps were lost (0
   when the stage checkpoints on notice; up to one checkpoint interval otherwise);
2. later, worker 2 and everything under it get SIGKILL (the node dies); the heartbeat automation marks
   the run Crashed, the recovery automation schedules it, worker 3 continues from the last checkpoint.
The run then completes; its losses are compared with base_train run uninterrupted (same settings, same
inputs, one torchrun by hand), and the MLflow parent, children and registered versions are checked.
3. A run whose download points at a source that does not exist fails each attempt and stops after
   NANOCHAT_MAX_ATTEMPTS (3) with one line naming the attempts.
Every process started is stopped by PID at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "rehearsal"
SAVE_EVERY = 15  # tiny's base_train is 60 steps: checkpoints at 15, 30, 45 and 60
CFG = {"preset": "tiny", "devices_per_node": 2, "base_train": {"save_every": SAVE_EVERY}}
# Between GCP's ~30 s notice and AWS's 2 min. Prefect's `flow-run execute` itself gives the flow 30 s.
GRACE_S = 90
MAX_ATTEMPTS = 3  # deployments/prefect.yaml's NANOCHAT_MAX_ATTEMPTS
PG_BIN = Path("/usr/lib/postgresql/15/bin")
STEP_RE = re.compile(r"step (\d{5})/\d{5} \| loss")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(probe, timeout: float, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    return None


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except OSError:
        return False


class Checks:
    def __init__(self):
        self.passed, self.failed = 0, 0

    def __call__(self, ok: bool, what: str, detail: str = "") -> bool:
        self.passed, self.failed = self.passed + bool(ok), self.failed + (not ok)
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)
        return ok


class Stack:
    """The processes of the rehearsal, each in a process group of its own, all stopped at exit."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env, self.procs = root, env, {}
        self.cleanup: list[Path] = []  # directories outside root to delete at the end (PostgreSQL's)

    def start(self, name: str, argv: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(argv, cwd=cwd or REPO, env={**self.env, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill_tree(self, name: str) -> int:
        """SIGKILL a process and every process below it (the node dies); returns how many were killed."""
        root = self.procs[name].pid
        victims = [root, *descendants(root)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs[name].wait()
        return len(victims)

    def notice(self, name: str, grace: float) -> tuple[int, int]:
        """A node given notice: its flow runs' `prefect flow-run execute` (what Kubernetes or docker signal,
        a job's main process) get SIGTERM, and the worker takes no more work; whatever of the tree is left
        after `grace` s gets SIGKILL with the worker (the node is gone). Returns (signalled, killed).

        The worker is frozen (SIGSTOP), not SIGTERMed: a SIGTERMed process worker keeps polling until its
        runs end and took the rescheduled run back itself 4 s later (measured, prefect 3.8.8), and one
        that exits breaks its flow runs' output pipes, after which the run ended Crashed, not rescheduled.
        """
        root = self.procs[name].pid
        tree = descendants(root)
        signalled = [p for p in tree if b"flow-run\0execute" in _cmdline(p)]
        _signal(root, signal.SIGSTOP)
        for pid in signalled:
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(p) for p in tree):
            time.sleep(1)
        left = [p for p in tree if _alive(p)]
        for pid in [root, *left]:
            _signal(pid, signal.SIGKILL)
        self.procs[name].wait()
        return len(signalled), len(left)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                for pid in descendants(proc.pid):
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _cmdline(pid: int) -> bytes:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def main() -> int:
    check = Checks()
    root = Path(tempfile.mkdtemp(prefix="nanochat-rehearsal-"))
    s3_port, prefect_port, mlflow_port = free_port(), free_port(), free_port()
    s3 = f"http://127.0.0.1:{s3_port}"
    base = f"s3://{BUCKET}/run"
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api", "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}", "NANOCHAT_BASE_DIR": base,
        "NANOCHAT_FLOW_ROOT": str(REPO),
    }
    env.pop("NANOCHAT_FLOW_CACHE", None)
    os.environ.update(env)  # this process reads S3, Prefect and MLflow too
    # The smoke deployment's command, `prefect flow-run execute`, is found last: first on PATH the venv's
    # python3 would hide pip's configured index from the corpus stage (measured: it failed on it).
    env["PATH"] = f"{env.get('PATH', '')}:{BIN}"
    stack = Stack(root, env)
    started = time.time()
    print(f"rehearsal: logs in {root}", flush=True)
    try:
        rehearse(stack, check, root, s3_port, prefect_port, mlflow_port, base)
    except Exception as e:  # a step that could not even run is a failed check, not a traceback
        check(False, "the rehearsal ran to its end", f"{type(e).__name__}: {e}")
    finally:
        stack.stop_all()
        for path in stack.cleanup:  # PostgreSQL's cluster, even after Ctrl-C
            shutil.rmtree(path, ignore_errors=True)
    leftover = [name for name, p in stack.procs.items() if p.poll() is None]
    check(not leftover, "every process the rehearsal started is stopped", ", ".join(leftover))
    print(f"rehearsal: {check.passed} passed, {check.failed} failed in {time.time() - started:.0f} s", flush=True)
    if not check.failed:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if check.failed else 0


def prefect(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if out.returncode or "Traceback" in out.stdout + out.stderr:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out


def run_deployment(cfg: dict, *extra: str) -> str:
    out = prefect("deployment", "run", "nanochat/smoke", "--param", f"cfg={json.dumps(cfg)}", *extra)
    return re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)


def start_postgres(stack: Stack, port: int) -> str:
    """A PostgreSQL 15 cluster of its own on 127.0.0.1:`port` with databases `prefect` and `mlflow`;
    returns the URL without the database. initdb and postgres refuse to run as root, so as root they run
    as Debian's `postgres` user (setpriv execs, so the PID stack.start keeps is the postmaster's)."""
    data = Path(tempfile.mkdtemp(prefix="nanochat-pg-"))  # not under the 0700 root: postgres must reach it
    as_user: list[str] = []
    if os.getuid() == 0:
        shutil.chown(data, "postgres", "postgres")
        as_user = ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--"]
    stack.cleanup.append(data)
    subprocess.run([*as_user, str(PG_BIN / "initdb"), "-D", str(data / "db"), "-U", "nanochat", "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True, cwd=data)
    # fsync off: a rehearsal's database need not survive a power cut, and fsyncs cost seconds on 2 cores.
    stack.start("postgres", [*as_user, str(PG_BIN / "postgres"), "-D", str(data / "db"), "-h", "127.0.0.1",
                             "-p", str(port), "-k", str(data), "-c", "fsync=off", "-c", "max_connections=200"],
                cwd=data)
    ready = wait_for(lambda: subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "nanochat"],
                                            capture_output=True).returncode == 0, 60)
    if not ready:
        raise RuntimeError(f"PostgreSQL did not start; see {stack.root}/postgres.log")
    for db in ("prefect", "mlflow"):
        subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "nanochat", db],
                       check=True, capture_output=True)
    return f"nanochat@127.0.0.1:{port}"


def log_steps(path: Path) -> list[int]:
    """The base_train steps a worker's log shows (its flow runs' lines stream through it)."""
    try:
        return [int(m.group(1)) for m in STEP_RE.finditer(path.read_text(errors="replace"))]
    except OSError:
        return []


def resumed_step(path: Path) -> int | None:
    try:
        m = re.search(r"resumed from step (\d+)", path.read_text(errors="replace"))
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rehearse(stack: Stack, check: Checks, root: Path, s3_port: int, prefect_port: int, mlflow_port: int,
             base: str) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from pydantic import TypeAdapter

    from nanochat_core import checkpoint, storage
    from nanochat_core.presets import PresetConfig

    # --- the stack -----------------------------------------------------------------------------
    moto_python = os.environ["NANOCHAT_MOTO_PYTHON"]
    stack.start("s3", [moto_python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)])
    pg = start_postgres(stack, free_port())
    check(True, "PostgreSQL 15 serves databases prefect and mlflow", pg)
    stack.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                   "--port", str(prefect_port)],
                env={"PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{pg}/prefect"})
    check(bool(wait_for(lambda: answers(f"http://127.0.0.1:{s3_port}/"), 60)), "S3 endpoint (moto) answers")
    import s3fs

    s3fs.S3FileSystem(anon=False).mkdir(BUCKET)
    stack.start("mlflow-server", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                                  "--workers", "1", "--backend-store-uri", f"postgresql+psycopg2://{pg}/mlflow",
                                  "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"])
    for name, url in (("prefect-server", f"http://127.0.0.1:{prefect_port}/api/health"),
                      ("mlflow-server", f"http://127.0.0.1:{mlflow_port}/health")):
        proc = stack.procs[name]
        up = wait_for(lambda: answers(url) or proc.poll() is not None, 240) and proc.poll() is None
        if not check(up, f"{name} healthy on PostgreSQL", "" if up else f"it exited; see {root}/{name}.log"):
            raise RuntimeError(f"{name} did not start")
    prefect("work-pool", "create", "local", "--type", "process")
    subprocess.run([sys.executable, "-m", "flows.automations"], cwd=REPO, check=True, capture_output=True)
    prefect("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "smoke")
    check(True, "deployed nanochat/smoke from deployments/prefect.yaml; heartbeat and recovery automations in place")

    def worker(name: str) -> Path:
        # Another node: its own directory, Prefect home and caches; only the code and the env are shared.
        home = root / name
        home.mkdir()
        stack.start(name, [str(BIN / "prefect"), "worker", "start", "--pool", "local", "--name", name],
                    cwd=home, env={"PREFECT_HOME": str(home / "prefect"), "HOME": str(home),
                                   "TMPDIR": str(home), "XDG_CACHE_HOME": str(home / "cache")})
        return root / f"{name}.log"

    client = get_client(sync_client=True)
    client.__enter__()
    ckpt = f"{base}/base_checkpoints/d2"

    def run_of(run_id: str):
        return client.read_flow_run(run_id)

    def settled(run_id: str) -> bool:
        # One read per look: Crashed is final but, under the recovery automation, the run leaves it within
        # a second; reading the state twice once saw Crashed, then Recovering, and took that for the end.
        state = run_of(run_id).state
        return state.is_final() and not state.is_crashed()

    def attempt_running(run_id: str, attempt: int) -> bool:
        run = run_of(run_id)
        return run.run_count >= attempt and run.state.is_running()

    def first_state(run_id: str, name: str, after: float):
        """Seconds from `after` to the run's first `name` state after it (the server's timestamps)."""
        stamps = [s.timestamp.timestamp() for s in client.read_flow_run_states(run_id) if s.name == name]
        return next((round(t - after) for t in sorted(stamps) if t >= after), None)

    def steps_logged(run_id: str, before: float) -> list[int]:
        """base_train's steps in the run's logs on the API (the flow ships them itself) before `before`."""
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200,
                                offset=0)
        found, offset = [], 0
        while logs:
            found += [int(m.group(1)) for log in logs if log.timestamp.timestamp() < before
                      for m in STEP_RE.finditer(log.message)]
            offset += len(logs)
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200,
                                    offset=offset)
        return found

    # --- one run, two preemptions, one command ------------------------------------------------------
    log1 = worker("worker-1")
    run_id = run_deployment(CFG)
    # Mid-interval: after the checkpoint at step 15 and before the one at 30, so a stage that cannot
    # checkpoint on notice loses steps (those since 15) and one that can loses none.
    if not wait_for(lambda: any(s >= 20 for s in log_steps(log1)), 900, every=1):
        raise RuntimeError(f"base_train never reached step 20 on worker-1; see {log1}")
    log2 = worker("worker-2")  # the pool's free worker
    noticed = time.time()
    signalled, killed = stack.notice("worker-1", GRACE_S)
    back = wait_for(lambda: attempt_running(run_id, 2), 600, every=1)
    resumed = wait_for(lambda: resumed_step(log2), 300, every=1)
    # What attempt 1 trained: its lines in the worker's log (which stops when the worker does) and on the
    # API (which the flow process ships until it ends), before attempt 2 began.
    second = min((s.timestamp.timestamp() for s in client.read_flow_run_states(run_id) if s.name == "Running"
                  and s.timestamp.timestamp() > noticed), default=time.time())
    reached = max([*log_steps(log1), *steps_logged(run_id, second)], default=0)
    lost = reached - resumed if resumed is not None else None
    # The stage checkpoints at the step it is in when notice comes (nanochat_core.notice): nothing is lost.
    check(bool(back) and resumed is not None and lost == 0,
          f"SIGTERM with {GRACE_S} s grace mid-base_train: the run lost {lost} steps and continued without a command "
          "on the second worker",
          f"attempt 1 reached step {reached}, attempt 2 resumed from step {resumed}; {signalled} flow-run process got "
          f"SIGTERM, {killed} processes were left for SIGKILL; back in the pool as "
          + (f"AwaitingRetry after {waiting} s" if (waiting := first_state(run_id, 'AwaitingRetry', noticed)) is not None
             else f"Crashed, then Recovering, after {first_state(run_id, 'Recovering', noticed)} s") + ", "
          f"attempt 2 Running after {second - noticed:.0f} s")

    # --- the second node dies without notice once it has a checkpoint of its own ---------------------
    if not wait_for(lambda: (checkpoint.latest_step(ckpt) or 0) > (resumed or 0) and
                    any(s > (checkpoint.latest_step(ckpt) or 0) for s in log_steps(log2)), 900, every=1):
        raise RuntimeError(f"attempt 2 wrote no checkpoint of its own; see {log2}")
    killed_at_step = checkpoint.latest_step(ckpt)
    log3 = worker("worker-3")
    killed = stack.kill_tree("worker-2")
    died = time.time()
    back = wait_for(lambda: attempt_running(run_id, 3), 600, every=1)
    crashed_s, recovering_s = first_state(run_id, "Crashed", died), first_state(run_id, "Recovering", died)
    recovered_s = first_state(run_id, "Running", died)
    resumed3 = wait_for(lambda: resumed_step(log3), 300, every=1)
    check(crashed_s is not None and bool(back) and resumed3 == killed_at_step,
          f"SIGKILL of worker 2: the run continued without a command from the last periodic checkpoint (step "
          f"{resumed3}) on the third worker",
          f"{killed} processes killed at checkpoint {killed_at_step}; Crashed after {crashed_s} s, Recovering after "
          f"{recovering_s} s, attempt 3 Running after {recovered_s} s")

    wait_for(lambda: settled(run_id), 900, every=2)
    final = run_of(run_id)
    check(final.state.is_completed(), "the run completed on its third attempt, one command in all",
          f"{final.state.name}, run_count {final.run_count}")
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])), limit=200)
    last = {}
    for t in sorted(runs, key=lambda t: t.created):
        last[t.name] = t.state.name
    upstream = ("corpus", "download[:3]", "download", "tok_train")
    check(all(last.get(t) == "Cached" for t in upstream), "the last attempt found the finished stages Cached on S3",
          ", ".join(f"{t} {last.get(t)}" for t in upstream))
    # exists() first: it drops this process's listing of the directory from before result.json was written.
    result = json.loads(storage.read_text(f"{ckpt}/result.json")) if storage.exists(f"{ckpt}/result.json") else {}
    check(result.get("resumed_from") == killed_at_step, f"base_train resumed from step {result.get('resumed_from')}",
          f"killed at step {killed_at_step}")
    meta = checkpoint.read_meta(ckpt, checkpoint.latest_step(ckpt))
    check(meta["world_size"] == 2, "base_train ran as torchrun --nproc_per_node=2 (gloo)", f"world {meta['world_size']}")

    # --- the uninterrupted reference: base_train alone, same settings and inputs -------------------------
    reference = f"{base}/reference/d2"
    cfg_path = root / "reference.json"
    cfg = TypeAdapter(PresetConfig).validate_python(CFG)
    cfg_path.write_text(cfg.model_copy(update={"base_train": cfg.base_train.model_copy(
        update={"out": reference})}).model_dump_json())
    ref_run = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
                              "nanochat_core.stages.base_train", "--config", str(cfg_path)],
                             cwd=REPO, capture_output=True, text=True, timeout=900)
    if check(ref_run.returncode == 0, "the uninterrupted reference base_train ran (torchrun, 2 processes)",
             ref_run.stderr[-500:] if ref_run.returncode else ""):
        losses = {}
        for name, d in (("continued", ckpt), ("uninterrupted", reference)):
            rows = [json.loads(line) for line in storage.read_text(f"{d}/metrics.jsonl").splitlines() if line.strip()]
            losses[name] = [r["train/loss"] for r in rows if "train/loss" in r]
        check(losses["continued"] == losses["uninterrupted"] and len(losses["continued"]) == 60,
              "the twice-interrupted base_train's losses equal the uninterrupted run's, step for step",
              f"final {losses['continued'][-1:]} vs {losses['uninterrupted'][-1:]}")

    # --- MLflow ---------------------------------------------------------------------------------
    check_tracking(check, run_id)
    check(storage.exists(f"{base}/prefect_results"), "Prefect's cache records live on S3", f"{base}/prefect_results")

    # --- 3. a stage that always fails: at most MAX_ATTEMPTS attempts, then one line -----------------------
    bad = {**CFG, "download": {"url_template": "file:///nonexistent/shard_{index:05d}.parquet"}}
    bad_id = run_deployment(bad)
    started = time.time()
    wait_for(lambda: settled(bad_id), 600, every=2)
    time.sleep(5)  # an automation that would (wrongly) answer the Failed state has time to show it (it takes <1 s)
    run = run_of(bad_id)
    message = run.state.message or ""
    check(run.state.is_failed() and run.run_count == MAX_ATTEMPTS and "\n" not in message
          and message.startswith(f"gave up after {MAX_ATTEMPTS} attempts"),
          f"a stage that always fails was attempted {run.run_count} times (at most {MAX_ATTEMPTS}) and stopped",
          f"{run.state.name} after {time.time() - started:.0f} s: {message[:400]}")
    client.__exit__(None, None, None)


def check_tracking(check: Checks, flow_run_id: str) -> None:
    """The re-run's MLflow parent: one complete row (a child per stage, cached ones too, and the headline
    figures), and the registered versions and aliases, their files in the S3 artifact store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("nanochat")
    # One parent per attempt (each attempt is a flow run's new start); the last one completed the pipeline.
    parents = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}' and "
                                 "tags.mlflow.parentRunId IS NULL", order_by=["attributes.start_time DESC"])
    if not check(len(parents) >= 1 and parents[0].info.status == "FINISHED",
                 "the last attempt has a finished MLflow parent run", f"{len(parents)} parents for the flow run"):
        return
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    cached = sorted(c.info.run_name for c in children if c.data.tags.get("cached") == "true")
    check({"base_train", "mid_train", "chat_sft"} <= {c.info.run_name for c in children} and "tok_train" in cached,
          "the parent has a child per stage, the cached ones tagged cached=true",
          f"{len(children)} children, cached: {', '.join(cached)}")
    headline = {k: round(v, 4) for k, v in parent.data.metrics.items()
                if k in ("base/val_bpb", "base/core", "sft/chatcore", "time/total_s", "cost/est_usd")}
    check(len(headline) == 5, "the parent carries the headline metrics", str(headline))
    aliases = {alias: client.get_model_version_by_alias("nanochat", alias)
               for alias in ("base", "mid", "sft", "rl", "champion")}
    sft = aliases["sft"]
    # Not the checkpoint directory (…/chatsft_checkpoints/d2): a copy of its own. ("d2" alone also turns up
    # inside logged-model ids, m-…d2…, which failed this check once.)
    check(sft.source.startswith(("models:/", "s3://", "mlflow-artifacts:")) and "_checkpoints/" not in sft.source,
          "@base @mid @sft @rl @champion name versions stored in the artifact store",
          ", ".join(f"@{a} v{v.version}" for a, v in aliases.items()) + f"; @sft from {sft.source}")


if __name__ == "__main__":
    sys.exit(main())
