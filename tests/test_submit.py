"""`mpqsweep submit` against a real Ray cluster: `ray start --head` on 127.0.0.1 with Ray 2.60's token
auth switched on, a tiny study submitted as a job through the real CLI (working dir upload, log
streaming, the driver joining the cluster), stop/logs, and bad input that must not leave a job behind.

The head runs with ``--block`` in its own session; teardown stops any unfinished job, SIGTERMs that one
process (Ray's own shutdown then stops every process it started) and SIGKILLs whatever of its process
tree is left — never ``ray stop``, which would stop other Ray instances on the machine.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT = "configs/default.yaml"
# The embedded default shrunk to a job of well under a minute: digits, random-init FP weights (no
# pretrain stage), one indicator epoch, 3 BitOps points, one LIMPQ policy finetuned for one epoch.
TINY = ["study.name=tiny-cluster", "data.name=digits", "data.batch_size=32", "indicators.epochs=1",
        "search.alpha=[2.0]", "search.bitops=[w2a2..w6a6:3]", "search.compression_ratio=[none]",
        "mixquant.qem=[2,8]", "baselines.uniform=[[4,4]]", "baselines.random_per_budget=0",
        "select.max_policies=1", "select.include_uniform=false", "finetune.epochs=1",
        "finetune.bn_recalib_batches=2"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    address: str
    root: Path
    env: dict                   # HOME holds the cluster's token: what a user on the head would have
    proc: subprocess.Popen

    def cli(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env or self.env,
                              capture_output=True, text=True, timeout=timeout)

    @property
    def token_file(self) -> str:
        return str(Path(self.env["HOME"]) / ".ray" / "auth_token")

    def client(self):
        from orchestrator.jobs import connect

        return connect(self.address, self.token_file).client

    def wait(self, sub_id: str, timeout: float = 120) -> str:
        client, deadline = self.client(), time.time() + timeout
        while time.time() < deadline:
            status = str(client.get_job_status(sub_id))
            if status in TERMINAL:
                return status
            time.sleep(0.5)
        return status


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) from /proc, or None when the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19]


def _descendants(root: int) -> dict[int, str]:
    """Every process below ``root`` (drivers run in sessions of their own), with its start time so a
    reused pid is never mistaken for one of them."""
    children: dict[int, list[int]] = {}
    start: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _proc_stat(int(entry.name))):
            children.setdefault(st[0], []).append(int(entry.name))
            start[int(entry.name)] = st[1]
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = start[child]
            todo.append(child)
    return out


def pid_alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has exited
    except OSError:
        return False


def _stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process (Ray shuts down what it started), then SIGKILL any
    survivor of the tree it had — only processes this test started."""
    tree = _descendants(proc.pid) if proc.poll() is None else {}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    for pid, started in tree.items():
        st = _proc_stat(pid)
        if st is not None and st[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@pytest.fixture(scope="module")
def head():
    # A short root: Ray's AF_UNIX socket paths under the temp dir must stay below ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="mpqh-"))
    home = root / "h"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI",
                                                             "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    ray = str(BIN / "ray")
    # Token auth: the head starts in token mode and reads the token from ~/.ray/auth_token.
    gen = subprocess.run([ray, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0 and (home / ".ray" / "auth_token").is_file(), gen.stderr
    ports = {k: _free_port() for k in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                       "dashboard-agent-grpc-port", "ray-client-server-port", "node-manager-port",
                                       "object-manager-port", "metrics-export-port", "runtime-env-agent-port")}
    cmd = [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(root / "r"), "--disable-usage-stats"]
    cmd += [a for k, v in ports.items() for a in (f"--{k}", str(v))]
    log = open(root / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(f"http://127.0.0.1:{ports['dashboard-port']}", root, env, proc)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None and time.time() < deadline, (root / "head.log").read_text()[-3000:]
            try:
                if requests.get(h.address + "/api/authentication_mode", timeout=2).json() == {
                        "authentication_mode": "token"}:
                    from orchestrator.jobs import alive_nodes, connect

                    if alive_nodes(connect(h.address, h.token_file)):
                        break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        import torch

        from workloads.models import build_model

        torch.manual_seed(0)
        torch.save({"model": build_model("small_cnn", 10, 1).state_dict()}, root / "fp.pt")
        yield h
    finally:
        try:
            client = h.client()
            for job in client.list_jobs():
                if str(job.status) not in TERMINAL:
                    client.stop_job(job.submission_id)
        except Exception:  # noqa: BLE001 - the head may be gone already
            pass
        _stop_tree(proc)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cli(capsys, monkeypatch):
    """The real CLI in-process (the checks before submitting need no Ray here): (exit code, stdout,
    stderr). ``home`` is the HOME it runs with, where ``~/.ray/auth_token`` is looked up."""
    from orchestrator.cli import main

    def run(*args: str, home: str | Path, **env: str) -> subprocess.CompletedProcess:
        monkeypatch.setenv("HOME", str(home))
        for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.chdir(ROOT)
        code = main(list(map(str, args)))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    return lines[0]


def test_unauthenticated_requests_are_refused(head):
    # Ray 2.60 token mode: the job API answers 401 without the Bearer token
    assert requests.get(head.address + "/api/jobs/", timeout=5).status_code == 401


def test_submit_tiny_study_succeeds(head):
    study = head.root / "study"
    t0 = time.perf_counter()
    r = head.cli("submit", DEFAULT, "--address", head.address, *TINY, f"study.dir={study}",
                 f"model.weights={head.root / 'fp.pt'}")
    took = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    sub_id = r.stdout.strip().splitlines()[0]
    assert sub_id.startswith("mpq-tiny-cluster-")
    assert f"using the Ray auth token from {head.env['HOME']}/.ray/auth_token" in r.stderr
    # the study's own lines streamed back (Ray's go to the study's logs/): it joined the cluster and ran
    # every stage
    assert "Connecting to existing Ray cluster" in (study / "logs" / "ray.log").read_text()
    assert "Connecting to existing Ray cluster" not in r.stdout + r.stderr
    for stage in ("indicators", "search", "select", "finetune", "ptq", "report"):
        assert f"[{stage}] finished" in r.stdout, r.stdout[-4000:]
    assert f"job {sub_id} SUCCEEDED" in r.stderr

    client = head.client()
    info = client.get_job_info(sub_id)
    assert str(info.status) == "SUCCEEDED" and info.metadata["mpq.study"] == "tiny-cluster"
    assert info.entrypoint.startswith("python -m orchestrator.cli run configs/default.yaml")
    assert info.entrypoint.endswith("resources.address=auto")

    search = pq.read_table(study / "search" / "search.parquet").to_pylist()
    assert {r["searcher"] for r in search} >= {"limpq", "mixquant", "uniform"}
    assert any(r["searcher"] == "limpq" and r["status"] == "optimal" for r in search)
    results = pq.read_table(study / "results" / "results.parquet").to_pylist()
    assert {(r["searcher"], r["stage"]) for r in results} >= {("limpq", "finetune"), ("limpq", "ptq")}
    assert all(0.0 <= r["top1"] <= 1.0 for r in results)
    assert (study / "timings.json").is_file() and (study / "config.yaml").is_file()
    assert (study / "report" / "index.html").is_file()
    print(f"submit of the tiny study took {took:.1f}s")


def test_no_wait_then_logs_and_stop(head, cli):
    home = head.env["HOME"]
    study = head.root / "stopped"
    r = cli("submit", DEFAULT, "--address", head.address, "--no-wait", *TINY, f"study.dir={study}",
            f"model.weights={head.root / 'fp.pt'}", "finetune.epochs=50", home=home)
    assert r.returncode == 0, r.stderr[-3000:]
    sub_id = r.stdout.strip()
    assert f"--stop {sub_id}" in r.stderr
    client = head.client()
    deadline = time.time() + 60
    while str(client.get_job_status(sub_id)) == "PENDING" and time.time() < deadline:
        time.sleep(0.5)
    assert str(client.get_job_status(sub_id)) == "RUNNING"
    logs = cli("submit", "--address", head.address, "--logs", sub_id, home=home)
    assert logs.returncode == 0 and f"Running entrypoint for job {sub_id}" in logs.stdout
    stop = cli("submit", "--address", head.address, "--stop", sub_id, home=home)
    assert stop.returncode == 0 and stop.stdout.strip() == f"{sub_id}: stop requested"
    assert head.wait(sub_id, timeout=60) == "STOPPED"
    driver = client.get_job_info(sub_id).driver_info
    if driver is not None and driver.pid:
        deadline = time.time() + 20
        while pid_alive(int(driver.pid)) and time.time() < deadline:
            time.sleep(0.5)
        assert not pid_alive(int(driver.pid)), "the stopped job's driver is still running"
    again = cli("submit", "--address", head.address, "--stop", sub_id, home=home)
    assert again.returncode == 0 and again.stdout.strip() == f"{sub_id}: was not running"
    assert "no job nope-123" in _one_line_error(cli("submit", "--address", head.address, "--stop", "nope-123",
                                                    home=home))


def test_gpu_config_on_cpu_cluster_is_refused_before_submitting(head, cli):
    before = {j.submission_id for j in head.client().list_jobs()}
    r = cli("submit", DEFAULT, "--address", head.address, *TINY, f"study.dir={head.root / 'gpu'}",
            "resources.use_gpu=true", home=head.env["HOME"])
    line = _one_line_error(r)
    assert "cannot run this config: resources.use_gpu=true needs 1 GPU worker(s) but the cluster has 0 GPU(s)" in line
    assert "nothing was submitted" in line
    assert {j.submission_id for j in head.client().list_jobs()} == before   # no job, nothing orphaned
    assert not (head.root / "gpu").exists()


def test_auth_errors_are_one_line(head, cli, tmp_path):
    before = {j.submission_id for j in head.client().list_jobs()}
    line = _one_line_error(cli("submit", DEFAULT, "--address", head.address, *TINY, home=tmp_path))
    assert "requires an auth token and none was found" in line
    line = _one_line_error(cli("submit", DEFAULT, "--address", head.address, *TINY, home=tmp_path,
                               RAY_AUTH_TOKEN="not-the-token"))
    assert "rejected the auth token" in line or "refused the auth token" in line
    assert {j.submission_id for j in head.client().list_jobs()} == before


def test_unreachable_address_is_one_line(cli, tmp_path):
    port = _free_port()  # nothing listens there
    line = _one_line_error(cli("submit", DEFAULT, "--address", f"http://127.0.0.1:{port}", *TINY, home=tmp_path))
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in line and "Connection refused" in line
    line = _one_line_error(cli("submit", DEFAULT, "--address", "ray://127.0.0.1:10001", home=tmp_path))
    assert "not a GCS or ray:// client address" in line
    line = _one_line_error(cli("submit", DEFAULT, home=tmp_path))
    assert "--address is required" in line


# ------------------------------------------------------------- pure parts of orchestrator.jobs
def test_resource_shortfall():
    from orchestrator.config import load_config
    from orchestrator.resources import resource_shortfall

    def cfg(*o):
        return load_config(ROOT / DEFAULT, list(o)).resources

    cpu2 = [{"CPU": 2.0}]
    gpu_cluster = [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert resource_shortfall(cpu2, cfg()) is None
    assert "needs 1 GPU worker(s) but the cluster has 0 GPU(s)" in resource_shortfall(
        cpu2, cfg("resources.use_gpu=true"))
    assert resource_shortfall(gpu_cluster, cfg("resources.use_gpu=true", "resources.cpus_per_worker=4")) is None
    assert "needs 2 GPU worker(s)" in resource_shortfall(gpu_cluster, cfg("resources.use_gpu=true",
                                                                          "resources.num_workers=2"))
    assert "no node has 1 GPU and 16 CPU(s)" in resource_shortfall(
        gpu_cluster, cfg("resources.use_gpu=true", "resources.cpus_per_worker=16"))
    assert "need 4 CPU(s) but the cluster has 2" in resource_shortfall(cpu2, cfg("resources.num_workers=2",
                                                                              "resources.cpus_per_worker=2"))
    assert "no node has resources.cpus_per_worker=3" in resource_shortfall([{"CPU": 2.0}, {"CPU": 2.0}],
                                                                        cfg("resources.cpus_per_worker=3"))


def test_finetune_plan_fits_what_the_preflight_check_accepts():
    """Every cluster the pre-flight check accepts can run a finetune trial: with DDP the trial is a
    light driver (1 CPU only when one is spare) and trials in flight are what the cluster can feed."""
    from orchestrator.config import load_config
    from orchestrator.resources import DRIVER_MEMORY, finetune_plan, resource_shortfall

    r50 = load_config(ROOT / "configs/imagenet_resnet50.yaml", ["data.root=/data"]).resources
    for nodes, driver_cpus in (([{"CPU": 64.0, "GPU": 8.0}], 0), ([{"CPU": 8.0}, {"CPU": 64.0, "GPU": 8.0}], 1)):
        assert resource_shortfall(nodes, r50) is None
        plan = finetune_plan(nodes, r50)
        assert plan.distributed and plan.max_concurrent == 1
        assert plan.trial_resources == {"cpu": driver_cpus, "memory": DRIVER_MEMORY}
    assert finetune_plan([{"CPU": 8.0}] + [{"CPU": 64.0, "GPU": 8.0}] * 2, r50).max_concurrent == 2  # 16 GPUs
    small = load_config(ROOT / DEFAULT, ["resources.num_workers=2"]).resources
    assert finetune_plan([{"CPU": 2.0}], small).trial_resources["cpu"] == 0
    assert finetune_plan([{"CPU": 3.0}], small).trial_resources["cpu"] == 1
    assert finetune_plan([{"CPU": 8.0}], small).max_concurrent == 2
    assert finetune_plan([{"CPU": 8.0}], small, max_concurrent=1).max_concurrent == 1
    one = load_config(ROOT / DEFAULT, []).resources
    plan = finetune_plan([{"CPU": 2.0}], one)
    assert not plan.distributed and plan.trial_resources == {"cpu": 1, "gpu": 0} and plan.max_concurrent == 2


def test_token_lookup_order(tmp_path, monkeypatch):
    from orchestrator.errors import UserError
    from orchestrator.jobs import load_token

    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert load_token() == ("home-token", str(tmp_path / ".ray" / "auth_token"))
    path = tmp_path / "tok"
    path.write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert load_token()[0] == "path-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert load_token() == ("env-token", "$RAY_AUTH_TOKEN")
    assert load_token(str(path))[0] == "path-token"                # --token-file wins
    with pytest.raises(UserError, match="--token-file .* is not a readable, non-empty token file"):
        load_token(str(tmp_path / "missing"))
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match=r"\$RAY_AUTH_TOKEN_PATH"):  # set but unusable: Ray refuses too
        load_token()


def test_runtime_env_and_entrypoint(tmp_path):
    import shlex

    import yaml

    from orchestrator.errors import UserError
    from orchestrator.jobs import (
        build_runtime_env,
        config_in_working_dir,
        entrypoint,
        normalize_address,
        read_runtime_env_file,
    )

    base = read_runtime_env_file(str(ROOT / "cluster" / "runtime_env.yaml"))
    env = build_runtime_env(ROOT, base=base, env_vars={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert env["working_dir"] == str(ROOT) and ".venv/" in env["excludes"] and "studies/" in env["excludes"]
    assert env["pip"] == yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())["pip"]
    assert env["env_vars"] == {"RAY_DEDUP_LOGS": "0", "RAY_TRAIN_V2_ENABLED": "1",
                               "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    pinned = build_runtime_env(ROOT, pip=True)["pip"]
    assert pinned["packages"] == base["pip"]["packages"]          # --pip == cluster/runtime_env.yaml

    f = tmp_path / "renv.yaml"
    f.write_text("working_dir: /elsewhere\nexcludes: [data/]\n")
    assert "working_dir" not in read_runtime_env_file(str(f))    # --working-dir decides what is uploaded
    assert "data/" in build_runtime_env(ROOT, base=read_runtime_env_file(str(f)))["excludes"]
    f.write_text("[1, 2]\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        read_runtime_env_file(str(f))

    cmd = entrypoint("configs/default.yaml", ["search.bitops=[w2a2..w6a6:3]", "study.dir=/mnt/shared/x y"])
    assert shlex.split(cmd) == ["python", "-m", "orchestrator.cli", "run", "configs/default.yaml",
                                "search.bitops=[w2a2..w6a6:3]", "study.dir=/mnt/shared/x y", "resources.address=auto"]
    assert config_in_working_dir(ROOT / DEFAULT, ROOT) == DEFAULT
    with pytest.raises(UserError, match="outside --working-dir"):
        config_in_working_dir(tmp_path / "c.yaml", ROOT)
    assert normalize_address("head:8265/") == "http://head:8265"
    with pytest.raises(UserError, match="not a GCS or ray:// client address"):
        normalize_address("ray://head:10001")


def test_overrides_may_follow_options():
    from orchestrator.cli import build_parser

    a = build_parser().parse_args(["submit", DEFAULT, "a.b=1", "--address", "http://h:8265", "c.d=2", "--no-wait",
                                   "--env", "K=V", "e.f=3"])
    assert (a.config, a.overrides, a.address, a.no_wait, a.env) == (DEFAULT, ["a.b=1", "c.d=2", "e.f=3"],
                                                                    "http://h:8265", True, ["K=V"])
