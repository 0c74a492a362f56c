"""The files in cluster/, checked at schema level without a cloud or Kubernetes: the launcher YAML
through Ray's own validation (the checks `ray up` runs before it contacts AWS), the KubeRay manifests'
required keys, and every version in them against the installed Ray and constraints.txt."""
from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from orchestrator.config import load_config
from orchestrator.jobs import pinned_requirements

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CONSTRAINTS = ROOT / "constraints.txt"
SHARED = "/mnt/shared"


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = ver.strip()
    return out


def docs(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / rel).read_text()) if d]


def ray_image_ok(image: str, gpu: bool) -> None:
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|gpu|cu\d+)", image)
    assert m, f"{image} is not a pinned rayproject/ray:<version>-py<XY>-<cpu|gpu|cuNNN> tag"
    assert m.group(1) == ray.__version__, f"{image} does not match the installed ray {ray.__version__}"
    assert (int(m.group(2)), int(m.group(3))) >= (3, 10)
    assert (m.group(4) != "cpu") == gpu, f"{image}: {'GPU' if gpu else 'CPU'} group with the wrong image flavour"


def test_constraints_pin_the_installed_ray():
    assert pins()["ray"] == ray.__version__


# ------------------------------------------------------------------------- cluster launcher
def test_launcher_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(cfg)                                   # Ray's JSON schema + node-type rules
    prepared = prepare_config(copy.deepcopy(cfg))          # merged with Ray's AWS defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0
    gpu_groups = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    assert gpu_groups and all(0 <= g["min_workers"] <= g["max_workers"] <= cfg["max_workers"] for g in gpu_groups)

    ray_image_ok(cfg["docker"]["head_image"], gpu=False)
    ray_image_ok(cfg["docker"]["worker_image"], gpu=True)
    assert any(f"{SHARED}:{SHARED}" in o for o in cfg["docker"]["run_options"])
    assert any(f"{SHARED}" in c and "mount" in c for c in cfg["initialization_commands"])

    # the pinned set and the package itself, the README's install command
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "-c /home/ray/mpq-sweep/constraints.txt /home/ray/mpq-sweep" in setup
    assert cfg["file_mounts"]["/home/ray/mpq-sweep"] == "."
    assert {".venv", ".git", "studies"} <= set(cfg["rsync_exclude"])

    # token auth on every node, with the token the laptop holds
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head_cmds and "--dashboard-host=0.0.0.0" in head_cmds
    assert f"--backend-store-uri sqlite:///{SHARED}/mlflow/mlflow.db" in head_cmds
    assert "--port 5000" in head_cmds and "--host 127.0.0.1" in head_cmds


def test_launcher_yaml_rejects_a_broken_copy():
    """The validation above can fail: a misspelt key and a missing head type are caught."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    bad = copy.deepcopy(cfg)
    bad["max_worker"] = bad.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = copy.deepcopy(cfg)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(bad)


# --------------------------------------------------------------------------------- KubeRay
def _containers(pod_template: dict) -> list[dict]:
    spec = pod_template["spec"]
    assert spec["containers"], "a pod template needs containers"
    for c in spec["containers"]:
        assert c.get("name") and c.get("image"), c
    return spec["containers"]


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion {spec['rayVersion']} != {ray.__version__}"
    assert spec["authOptions"] == {"mode": "token", "secretName": "mpq-ray-auth"}, where
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    (hc,) = _containers(head["template"])
    ray_image_ok(hc["image"], gpu=False)
    assert {p["containerPort"] for p in hc["ports"]} >= {6379, 8265, 10001}
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    volumes = [head["template"]["spec"]["volumes"]] + [g["template"]["spec"]["volumes"] for g in groups]
    for vols in volumes:
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": "mpq-shared"}} in vols, where
    gpu = 0
    for g in groups:
        assert g["groupName"] and 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        for c in _containers(g["template"]):
            ray_image_ok(c["image"], gpu=True)
            limits = c["resources"]["limits"]
            gpu += int(limits.get("nvidia.com/gpu", 0))
            assert int(limits["nvidia.com/gpu"]) == int(g["rayStartParams"]["num-gpus"])
    for c in [hc] + [c for g in groups for c in g["template"]["spec"]["containers"]]:
        assert {"name": "shared", "mountPath": SHARED} in c["volumeMounts"], f"{where}: {c['name']} lacks {SHARED}"
    assert gpu >= 1, f"{where}: no GPU worker group"


def test_raycluster_manifest():
    (rc,) = docs("kuberay/raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"], rc["metadata"]["name"]) == ("ray.io/v1", "RayCluster", "mpq-sweep")
    _check_cluster_spec(rc["spec"], "raycluster.yaml")
    env = {e["name"]: e.get("value") for e in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == mlflow_service_url()


def mlflow_service_url() -> str:
    objs = {d["kind"]: d for d in docs("kuberay/mlflow.yaml")}
    svc, dep = objs["Service"], objs["Deployment"]
    port = svc["spec"]["ports"][0]["port"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    return f"http://{svc['metadata']['name']}:{port}"


def test_mlflow_server_and_shared_storage_manifests():
    objs = {d["kind"]: d for d in docs("kuberay/mlflow.yaml")}
    dep = objs["Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"ghcr.io/mlflow/mlflow:v{pins()['mlflow']}"
    args = dict(a.split("=", 1) for a in c["args"])
    assert args["--backend-store-uri"] == f"sqlite:///{SHARED}/mlflow/mlflow.db"
    assert args["--artifacts-destination"].startswith(f"{SHARED}/")
    assert args["--host"] == "0.0.0.0" and int(args["--port"]) == objs["Service"]["spec"]["ports"][0]["targetPort"]
    assert "mlflow:5000" in args["--allowed-hosts"].split(",")   # MLflow 3 checks the Host header
    assert dep["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "mpq-shared"
    assert mlflow_service_url() == "http://mlflow:5000"

    (pvc,) = docs("kuberay/storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "mpq-shared"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]     # every Ray pod mounts it


def _overrides(entrypoint: str) -> tuple[str, list[str]]:
    parts = shlex.split(entrypoint)
    assert parts[:4] == ["python", "-m", "orchestrator.cli", "run"], entrypoint
    return parts[4], parts[5:]


def test_rayjob_manifest():
    (job,) = docs("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    _check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    # the entrypoint's config and overrides load and validate as they will on the cluster
    config, overrides = _overrides(spec["entrypoint"])
    assert (ROOT / config).is_file()
    cfg = load_config(ROOT / config, overrides)
    assert cfg.study.dir.startswith(f"{SHARED}/") and cfg.resources.storage_path.startswith(f"{SHARED}/")
    assert cfg.tracking.uri == mlflow_service_url()
    renv = yaml.safe_load(spec["runtimeEnvYAML"])
    assert re.fullmatch(r"https://\S+\.zip", renv["working_dir"])
    assert renv["pip"]["packages"] == yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["pip"]["packages"]


def test_runtime_env_pins_equal_constraints():
    renv = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    packages = renv["pip"]["packages"]
    assert packages == pinned_requirements(CONSTRAINTS)       # the project's direct deps at the tested pins
    p = pins()
    for req in packages:
        name, ver = req.split("==")
        assert p[re.sub(r"\[.*\]", "", name).lower()] == ver
    assert not any(r.lower().startswith("ray") for r in packages), "the image provides Ray"
    assert renv["pip"]["pip_check"] is False


# --------------------------------------------------------------------------------- nightly
@pytest.mark.parametrize("script", ["nightly/nightly_job.sh", "nightly/submit_nightly.sh"])
def test_nightly_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(CLUSTER / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (CLUSTER / script).stat().st_mode & 0o111, f"{script} is not executable"


def test_nightly_files_reference_what_exists():
    from orchestrator.regress import Tolerances

    Tolerances.load(str(CLUSTER / "nightly" / "tolerances.yaml"), {})   # unknown keys would fail
    job = (CLUSTER / "nightly" / "nightly_job.sh").read_text()
    for rel in re.findall(r"(?:configs|cluster)/[\w./-]+\.(?:yaml|sh)", job):
        assert (ROOT / rel).is_file(), rel
    assert "orchestrator.cli regress --baseline" in job and "resources.address=auto" in job
    submit = (CLUSTER / "nightly" / "submit_nightly.sh").read_text()
    assert "ray job submit" in submit and "--working-dir ." in submit and "export RAY_AUTH_MODE=token" in submit
    cron = [l for l in (CLUSTER / "nightly" / "crontab").read_text().splitlines() if re.match(r"^[0-9*]", l)]
    assert len(cron) == 1 and cron[0].split()[:5] == ["0", "2", "*", "*", "*"]
    assert "cluster/nightly/submit_nightly.sh" in cron[0]


def test_cluster_readme_names_only_existing_files():
    text = (CLUSTER / "README.md").read_text()
    for rel in set(re.findall(r"\b(?:cluster|configs)/[\w./-]+\.(?:yaml|sh|md)\b", text)):
        assert (ROOT / rel).is_file(), f"cluster/README.md names {rel}, which does not exist"
