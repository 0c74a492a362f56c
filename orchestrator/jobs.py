"""Running a study as a Ray job: connect to a cluster's job server (with Ray 2.60's token auth),
check that the cluster can ever satisfy the config, submit, follow the logs, report the outcome.

Token auth. A Ray 2.60 head started with ``RAY_AUTH_MODE=token`` (or with a token already present)
answers 401 on every job-server route without ``Authorization: Bearer <token>``. Ray's own SDK only
adds that header when token mode is switched on *in the client process* (``RAY_AUTH_MODE=token``),
which a laptop usually does not have. So we ask the head first: ``GET /api/authentication_mode`` is
public. When it says ``token`` we load the token the way Ray documents it — ``$RAY_AUTH_TOKEN``, else
the file at ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (``ray get-auth-token`` on the head
prints it) — and pass the header explicitly to ``JobSubmissionClient``; the SDK leaves a
caller-provided ``Authorization`` header alone. The token never goes into the job's runtime_env,
its metadata or our output.

Resource check. Before submitting anything we read the alive nodes' resources from the dashboard's
state API (``/api/v0/nodes``), so a config the cluster cannot satisfy (``resources.use_gpu=true`` on a
CPU-only cluster) is refused without ever creating a job — nothing can be orphaned. Autoscaling
clusters whose GPU groups scale from zero skip the check (``--skip-resource-check``).
"""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from .config import Config
from .errors import UserError
from .resources import resource_shortfall

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
HTTP_TIMEOUT = 10.0

# Never uploaded with the working dir: environments, outputs, caches (Ray also honours .gitignore).
DEFAULT_EXCLUDES = [".venv/", "venv/", ".git/", "studies/", "mlruns/", "**/__pycache__/", "*.pyc",
                    ".pytest_cache/", "*.egg-info/", "build/", "dist/", "*.pt", "*.ckpt"]

# Packages the cluster image provides already; reinstalling Ray from a runtime_env breaks the job.
NOT_FROM_PIP = {"ray"}


def normalize_address(address: str) -> str:
    """``HEAD:8265`` -> ``http://HEAD:8265``; no trailing slash."""
    address = address.strip().rstrip("/")
    if not address:
        raise UserError("--address is empty; give the Ray dashboard address, e.g. http://HEAD:8265")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address} must be the Ray dashboard's http(s)://HOST:PORT (default port 8265),"
                        " not a GCS or ray:// client address")
    return address


# ------------------------------------------------------------------------------ auth
def load_token(token_file: str | None = None) -> tuple[str, str] | None:
    """(token, where it came from): ``--token-file``, then Ray's documented order ($RAY_AUTH_TOKEN,
    the file at $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); None when there is none."""
    def read(path: Path, what: str) -> str:
        # As Ray does: a named but unreadable or empty file is a misconfiguration, not "no token".
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if not text:
            raise UserError(f"{what} {path} is not a readable, non-empty token file")
        return text

    if token_file:
        return read(Path(token_file).expanduser(), "--token-file"), f"--token-file {token_file}"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        p = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        return read(p, "$RAY_AUTH_TOKEN_PATH"), f"$RAY_AUTH_TOKEN_PATH ({p})"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None


def cluster_auth_mode(address: str) -> str:
    """'token', 'disabled', or 'unknown' (a head too old to say). Unreachable -> UserError."""
    import requests

    try:
        r = requests.get(f"{address}/api/authentication_mode", timeout=HTTP_TIMEOUT)
    except requests.exceptions.RequestException as e:
        raise UserError(f"cannot reach the Ray dashboard at {address} ({_reason(e)}); is the cluster up and "
                        "the port forwarded (`ray dashboard CLUSTER.yaml` / `kubectl port-forward`)?") from None
    if r.status_code == 200:
        try:
            return str(r.json().get("authentication_mode", "unknown"))
        except ValueError:
            pass
    if r.status_code in (200, 404):
        return "unknown"
    raise UserError(f"{address} does not look like a Ray dashboard (GET /api/authentication_mode answered "
                    f"{r.status_code})")


def _reason(e: BaseException) -> str:
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] [^')\"]+|Connection refused|timed out|Name or service not known", text)
    return m.group(0) if m else (text.splitlines()[0][:160] if text else type(e).__name__)


# ------------------------------------------------------------------------- connection
@dataclass
class Connection:
    """A JobSubmissionClient plus the headers it was made with (for our own REST calls)."""

    address: str
    headers: dict[str, str] = field(default_factory=dict)
    token_source: str | None = None
    client: Any = None

    def get(self, path: str) -> Any:
        import requests

        try:
            r = requests.get(self.address + path, headers=self.headers, timeout=HTTP_TIMEOUT)
        except requests.exceptions.RequestException as e:
            raise UserError(f"cannot reach the Ray dashboard at {self.address} ({_reason(e)})") from None
        if r.status_code in (401, 403):
            raise UserError(f"the Ray dashboard at {self.address} refused the auth token ({r.status_code})")
        if r.status_code != 200:
            raise UserError(f"GET {path} on {self.address} answered {r.status_code}")
        return r.json()


def connect(address: str, token_file: str | None = None) -> Connection:
    """Connect to the job server at ``address``, authenticating when the cluster requires it."""
    address = normalize_address(address)
    mode = cluster_auth_mode(address)
    headers: dict[str, str] = {}
    source = None
    found = load_token(token_file)
    if mode == "token" and found is None:
        raise UserError(f"the Ray cluster at {address} requires an auth token and none was found: set "
                        "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or --token-file (on the head: `ray get-auth-token`)")
    if found is not None and mode in ("token", "unknown"):
        headers["Authorization"] = f"Bearer {found[0]}"
        source = found[1]
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise UserError(f"the Ray cluster at {address} rejected the auth token from {source}") from None
    except (ConnectionError, RuntimeError) as e:
        raise UserError(f"cannot use the Ray job server at {address}: {str(e).splitlines()[0]}") from None
    return Connection(address, headers, source, client)


# ---------------------------------------------------------------------- resource check
def alive_nodes(conn: Connection) -> list[dict[str, float]]:
    """resources_total of every alive node, from the dashboard's state API."""
    data = conn.get("/api/v0/nodes?limit=10000&detail=1")
    rows = (data.get("data") or {}).get("result", {}).get("result", [])
    return [dict(n.get("resources_total") or {}) for n in rows if n.get("state") == "ALIVE"]


def check_cluster_fits(conn: Connection, cfg: Config) -> None:
    nodes = alive_nodes(conn)
    why = resource_shortfall(nodes, cfg.resources)
    if why:
        raise UserError(f"the cluster at {conn.address} cannot run this config: {why}; nothing was submitted "
                        "(use --skip-resource-check if an autoscaler adds such nodes on demand)")


# ----------------------------------------------------------------------- runtime_env
def pinned_requirements(constraints: Path) -> list[str]:
    """The project's direct dependencies pinned to the tested versions in ``constraints``."""
    from importlib import metadata

    from packaging.requirements import Requirement

    pins: dict[str, str] = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            pins[_canon(name)] = ver.strip()
    try:
        reqs = [Requirement(r) for r in metadata.requires("mpq-sweep") or []]
    except metadata.PackageNotFoundError:
        raise UserError("--pip needs mpq-sweep installed locally (pip install -e .) to know its dependencies") from None
    out = []
    for req in reqs:
        if req.marker is not None and "extra" in str(req.marker):
            continue  # test extras are not needed on the cluster
        name = _canon(req.name)
        if name in NOT_FROM_PIP:
            continue
        if name not in pins:
            raise UserError(f"--pip: {req.name} has no pinned version in {constraints}")
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.append(f"{req.name}{extras}=={pins[name]}")
    return sorted(out)


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def build_runtime_env(working_dir: Path, *, base: dict | None = None, pip: bool = False,
                      constraints: Path | None = None, env_vars: dict[str, str] | None = None) -> dict:
    """working_dir (always), plus a runtime_env file's keys, pinned pip packages, env vars."""
    env: dict[str, Any] = dict(base or {})
    env["working_dir"] = str(working_dir)
    env["excludes"] = list(dict.fromkeys([*DEFAULT_EXCLUDES, *(env.get("excludes") or [])]))
    merged_vars = {**(env.get("env_vars") or {}), **(env_vars or {})}
    if merged_vars:
        env["env_vars"] = {str(k): str(v) for k, v in merged_vars.items()}
    if pip:
        constraints = constraints or working_dir / "constraints.txt"
        if not constraints.is_file():
            raise UserError(f"--pip needs {constraints} (the pinned versions)")
        # pip_check off: the cluster image's Ray and its deps are not part of this list.
        env["pip"] = {"packages": pinned_requirements(constraints), "pip_check": False}
    return env


def read_runtime_env_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--runtime-env {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--runtime-env {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"--runtime-env {path} must hold a mapping")
    data.pop("working_dir", None)  # --working-dir decides what is uploaded
    return data


# ------------------------------------------------------------------------ entrypoint
def entrypoint(config_in_working_dir: str, overrides: list[str]) -> str:
    """The job's shell command. ``python -m orchestrator.cli`` is ``mpqsweep`` without needing
    mpq-sweep installed on the cluster: Ray puts the working dir first on PYTHONPATH, so the code that
    runs is exactly the code uploaded, whatever the image has.

    ``resources.address=auto`` (last, so it wins): the driver joins the cluster it runs on (Ray sets
    ``RAY_ADDRESS`` for a job) instead of starting a local Ray with the study's temp dir and CPU count,
    which a connecting ``ray.init`` refuses or cannot use."""
    parts = ["python", "-m", "orchestrator.cli", "run", config_in_working_dir, *overrides, "resources.address=auto"]
    return " ".join(shlex.quote(p) for p in parts)


def config_in_working_dir(config: Path, working_dir: Path) -> str:
    try:
        return config.resolve().relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise UserError(f"config {config} is outside --working-dir {working_dir}; the job only sees files "
                        "uploaded with the working dir") from None


def submission_id(study_name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", study_name).strip("-")[:40] or "study"
    return f"mpq-{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------------- job control
def submit(conn: Connection, *, entry: str, runtime_env: dict, sub_id: str, metadata: dict[str, str]) -> str:
    from ray.exceptions import AuthenticationError

    try:
        return conn.client.submit_job(entrypoint=entry, runtime_env=runtime_env, submission_id=sub_id,
                                      metadata=metadata)
    except AuthenticationError:
        raise UserError(f"the Ray cluster at {conn.address} rejected the auth token") from None
    except (RuntimeError, ValueError, ConnectionError) as e:
        raise UserError(f"job submission to {conn.address} failed: {str(e).splitlines()[0][:300]}") from None


def job_info(conn: Connection, sub_id: str):
    try:
        return conn.client.get_job_info(sub_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise UserError(f"no job {sub_id} on {conn.address}") from None
        raise UserError(f"cannot read job {sub_id}: {str(e).splitlines()[0][:300]}") from None


def stop(conn: Connection, sub_id: str) -> bool:
    job_info(conn, sub_id)  # a clear error for an unknown id
    return bool(conn.client.stop_job(sub_id))


def logs(conn: Connection, sub_id: str) -> str:
    job_info(conn, sub_id)
    return conn.client.get_job_logs(sub_id)


def follow(conn: Connection, sub_id: str, out: TextIO = sys.stdout, poll_s: float = 1.0,
           echo: Callable[[str], None] | None = None) -> Any:
    """Stream the job's logs until it ends; return its final JobDetails.

    The websocket tail is the cheap way; if it breaks (proxies, a head restart) we fall back to polling
    the full log and printing only what is new."""
    printed = 0

    async def tail() -> None:
        nonlocal printed
        async for chunk in conn.client.tail_job_logs(sub_id):
            out.write(chunk)
            out.flush()
            printed += len(chunk)

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - any transport failure: fall back to polling
        if echo:
            echo(f"log tail interrupted ({type(e).__name__}); polling instead")
    while True:
        info = job_info(conn, sub_id)
        text = conn.client.get_job_logs(sub_id)
        if len(text) > printed:
            out.write(text[printed:])
            out.flush()
            printed = len(text)
        if str(info.status) in TERMINAL:
            return info
        time.sleep(poll_s)


def exit_code_for(info: Any) -> int:
    """0 for SUCCEEDED; the driver's own exit code when it failed with one (2 = bad input); else 1."""
    status = str(info.status)
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    if isinstance(code, int) and code > 0:
        return code
    return 1
