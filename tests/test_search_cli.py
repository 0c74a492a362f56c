"""`mpqsweep search` end to end on LIMPQ's published ResNet-50 indicators: the README case gives the
published policy, a rerun resumes, and bad input is one `error:` line with exit code 2 (real CBC,
real Parquet, a real local Ray for the Ray runs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from orchestrator.cli import main
from orchestrator.grid import POINTS_DIR, POLICIES_FILE
from orchestrator.search_table import read_policies, read_search_table

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "limpq_resnet50.json"
if not REF.exists():
    pytest.skip(f"{REF} not present (shared/ sits beside the clone in CI)", allow_module_level=True)
CASE = json.loads(REF.read_text())["readme_case"]["expected"]
BASE = ["search", "--indicators", str(REF), "--macs-column", "limpq_macs", "--no-progress"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)  # the verb joins it instead of starting its own
    yield
    ray.shutdown()


def test_readme_case_without_ray(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(BASE + ["--bitops", "w3a4", "1e3", "--cr", "12.2", "--alpha", "2", "--out", str(out), "--no-ray"])
    text = capsys.readouterr().out
    assert code == 0
    rows = {r["bitops_label"]: r for r in read_search_table(out / POINTS_DIR)}
    ok = rows["w3a4"]
    assert ok["status"] == "optimal" and ok["w_bits"] == CASE["w_bits"] and ok["a_bits"] == CASE["a_bits"]
    assert round(ok["bitops"] / 1e9, 3) == CASE["gbitops"] and round(ok["size_mb"], 3) == CASE["size_mb"]
    assert round(ok["compression_ratio"], 3) == CASE["compression_ratio"]
    low = rows["1000"]  # a budget below the all-2-bit policy is a recorded infeasible point, not an error
    assert low["status"] == "infeasible" and "below the minimum" in low["reason"]
    assert "2 points: 1 optimal, 1 infeasible, 0 error; 1 distinct policies" in text
    assert ok["policy_id"] in text and "56.035" in text and "7.972" in text
    assert [p["policy_id"] for p in read_policies(out / POLICIES_FILE)] == [ok["policy_id"]]


def test_grid_on_ray_then_resume(local_ray, tmp_path, capsys):
    argv = BASE + ["--bitops", "w3a4", "w4a4", "--cr", "12.2", "none", "--alpha", "1", "2", "--out",
                   str(tmp_path / "out")]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "8 points:" in first and "8 solved now, 0 resumed" in first and "on Ray (2 CPUs)" in first
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "0 solved now, 8 resumed" in second
    rows = read_search_table(tmp_path / "out" / POINTS_DIR)
    assert len(rows) == 8 and all(r["status"] == "optimal" for r in rows)
    ref = next(r for r in rows if r["bitops_label"] == "w3a4" and r["compression_ratio_budget"] == 12.2
               and r["alpha"] == 2.0)
    assert ref["w_bits"] == CASE["w_bits"]


def _bad_table(tmp_path: Path, how: str) -> Path:
    d = json.loads(REF.read_text())
    if how == "nan":
        d["layers"][3]["act"]["4"] = None
    elif how == "missing":
        del d["layers"][7]["weight"]["2"]
    p = tmp_path / f"{how}.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("extra,match", [
    ([], "grid is empty"),
    (["--bitops", "w4a4", "--alpha", "-1"], "alpha must be a finite number >= 0"),
    (["--bitops", "w4x4"], "'w4x4'"),
    (["--cr", "4..16"], "'4..16'"),
    (["--bitops", "none", "--cr", "none"], "no point with a budget"),
    (["--bitops", "w4a4", "--bits", "8,4"], "no indicators"),
    (["--bitops", "w4a4", "--bits", "6,x"], "--bits"),
    (["--bitops", "w4a4", "--latency", "3"], "latency table"),
    (["--bitops", "w4a4", "--bounds", "BOUNDS"], "unknown layer"),
    (["--bitops", "w4a4", "--latency-table", "LATENCY", "--latency", "1e9"], "no cost for layer"),
    (["--bitops", "w4a4", "--indicators", "NAN"], "NaN"),
    (["--bitops", "w4a4", "--indicators", "MISSING"], "has no weight value for bits [2]"),
    (["--bitops", "w4a4", "--indicators", "NOFILE"], "does not exist"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, extra, match):
    bounds = tmp_path / "bounds.json"
    bounds.write_text(json.dumps({"layer9.nope": {"w_min": 4}}))
    lat = tmp_path / "lat.csv"
    lat.write_text("layer,w_bits,a_bits,cost\nlayer1.0.conv1,4,4,1.0\n")
    subst = {"BOUNDS": str(bounds), "LATENCY": str(lat), "NAN": str(_bad_table(tmp_path, "nan")),
             "MISSING": str(_bad_table(tmp_path, "missing")), "NOFILE": str(tmp_path / "nope.json")}
    argv = BASE + ["--out", str(tmp_path / "out"), "--no-ray"] + [subst.get(a, a) for a in extra]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and match in err, err
    assert not (tmp_path / "out" / POINTS_DIR).exists()  # nothing solved, nothing written
