"""Integration tests of the training stages on a real local Ray (Train V2): 2-rank DDP of the LIMPQ
joint step (ranks stay bit-identical, Algorithm 1's policy schedule), FP pretraining with DDP, the
indicator table on the embedded default, resume after a killed worker, bad input, and importing the
published ResNet-50 indicators."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch

from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.indicators import Indicators
from orchestrator.paths import StudyPaths
from orchestrator.train_loops import policy_generator
from orchestrator.training import run_indicators, run_pretrain
from workloads.models import build_model

pytestmark = pytest.mark.ray

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
DEFAULT = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
BITS = [6, 4, 2]
DIGITS = ["data.name=digits", "data.batch_size=32", f"indicators.bits={json.dumps(BITS)}",
          "baselines.uniform=[[2,2],[4,4],[6,6]]", "search.bitops=[w4a4]", "indicators.epochs=2",
          "resources.num_workers=2", "resources.cpus_per_worker=1", "resources.max_failures=2"]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(study_dir: Path, *overrides: str, config: str | None = None):
    return load_config(config, [f"study.dir={study_dir}", *overrides])


@pytest.fixture(scope="module")
def digits_fp(tmp_path_factory) -> Path:
    """Random-init small CNN weights for digits: enough for the mechanics tests, no pretraining."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fp") / "small_cnn_digits.pt"
    torch.save({"model": build_model("small_cnn", 10, 1).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def ddp_run(ray_local, digits_fp, tmp_path_factory):
    """One unfaulted 2-rank joint-training run with a per-rank step trace."""
    root = tmp_path_factory.mktemp("ddp")
    cfg = _cfg(root / "study", *DIGITS)
    res = run_indicators(cfg, StudyPaths(cfg.study_dir), digits_fp, trace_dir=root / "trace")
    traces = [[json.loads(line) for line in (root / "trace" / f"rank{r}.jsonl").read_text().splitlines()]
              for r in (0, 1)]
    return cfg, res, traces


def test_two_rank_joint_training_keeps_ranks_identical(ddp_run):
    cfg, res, (t0, t1) = ddp_run
    steps = [r for r in t0 if "policies" in r]
    assert len(steps) == res.steps == len(t1) - cfg.indicators.epochs > 0
    for a, b in zip(t0, t1):
        assert (a["step"], a["epoch"]) == (b["step"], b["epoch"])
        assert a["checksum"] == b["checksum"], f"ranks diverged at step {a['step']}"
    assert sum("epoch_end" in r for r in t0) == cfg.indicators.epochs  # buffers included there


def test_policy_schedule_is_algorithm_1(ddp_run):
    cfg, res, (t0, t1) = ddp_run
    n_layers = len(res.indicators.layers)
    gen = policy_generator(cfg.study.seed)
    for a, b in zip((r for r in t0 if "policies" in r), (r for r in t1 if "policies" in r)):
        assert a["policies"] == b["policies"]
        pols = a["policies"]
        assert len(pols) == len(BITS) + 1
        for bit, (w, act) in zip(BITS, pols[:-1]):  # n key policies, in candidate order
            assert w == [bit] * n_layers and act == [bit] * n_layers
        idx = torch.randint(len(BITS), (n_layers, 2), generator=gen).tolist()  # then one random policy
        assert pols[-1] == [[BITS[i] for i, _ in idx], [BITS[j] for _, j in idx]]


def test_indicator_outputs_written(ddp_run):
    cfg, res, _ = ddp_run
    paths = StudyPaths(cfg.study_dir)
    assert res.indicators.bits == BITS and [f.name for f in res.indicators.fixed] == ["features.0", "fc"]
    assert Indicators.load(paths.indicators_parquet).to_json_dict() == res.indicators.to_json_dict()
    assert Indicators.load(paths.indicators_json).names == res.indicators.names
    state = torch.load(paths.indicator_model, weights_only=True)
    assert any(".step.2" in k for k in state["model"])
    assert [row["epoch"] for row in res.history] == [0, 1] and res.attempt_starts == [0]
    assert res.metrics["steps"] == res.steps and "val_top1_w2a2" in res.metrics
    # skipped the second time, nothing retrained
    again = run_indicators(cfg, paths, None)
    assert again.skipped and again.indicators.to_json_dict() == res.indicators.to_json_dict()


def test_killed_worker_resumes_from_last_epoch_checkpoint(ddp_run, digits_fp, tmp_path, monkeypatch):
    cfg0, ref, _ = ddp_run
    steps_per_epoch = ref.steps // cfg0.indicators.epochs
    monkeypatch.setenv("MPQ_TEST_FAULT_STEP", str(steps_per_epoch + 3))  # rank 1 dies inside epoch 1
    monkeypatch.setenv("MPQ_TEST_FAULT_MARKER", str(tmp_path / "fired"))
    cfg = _cfg(tmp_path / "study", *DIGITS)
    res = run_indicators(cfg, StudyPaths(cfg.study_dir), digits_fp)
    assert (tmp_path / "fired").exists(), "the fault hook never fired"
    assert res.attempt_starts == [0, 1]          # the second attempt resumed at epoch 1, not from scratch
    assert res.steps == ref.steps                # same optimizer steps as the unfaulted run
    a, b = res.indicators.to_json_dict(), ref.indicators.to_json_dict()
    for la, lb in zip(a["layers"], b["layers"]):  # resume is exact: RNGs, sampler epoch, momentum restored
        for kind in ("weight", "act"):
            assert la[kind] == pytest.approx(lb[kind], rel=1e-5), la["name"]


def test_embedded_default_pretrain_ddp_and_indicators_grow_as_bits_fall(ray_local, tmp_path, capsys):
    cfg = _cfg(tmp_path / "study", "pretrain.epochs=2", "indicators.epochs=1", "data.indicator_fraction=0.5",
               "resources.num_workers=2", config=DEFAULT)
    paths = StudyPaths(cfg.study_dir)
    pre = run_pretrain(cfg, paths, trace_dir=tmp_path / "trace")
    r0, r1 = ([json.loads(line) for line in (tmp_path / "trace" / f"rank{r}.jsonl").read_text().splitlines()]
              for r in (0, 1))
    assert [x["checksum"] for x in r0] == [x["checksum"] for x in r1]  # DDP kept the ranks identical
    assert pre.history[-1]["top1"] > 0.85, pre.history
    assert torch.load(paths.fp_checkpoint, weights_only=True).keys() == {"model"}

    res = run_indicators(cfg, paths, pre)
    ind = res.indicators
    grow = total = 0
    for layer in ind.layers:
        for values in (layer.weight, layer.act):
            for hi, lo in zip(ind.bits, ind.bits[1:]):
                total += 1
                grow += values[lo] > values[hi]
    assert grow / total >= 0.9, f"only {grow}/{total} indicators grow as bits fall"
    assert res.history[-1]["val_top1_w6a6"] > 0.8, res.history

    # the CLI verb on the same study: both stages done, so it only reports
    assert main(["indicators", DEFAULT, f"study.dir={cfg.study_dir}", "pretrain.epochs=2",
                 "indicators.epochs=1", "data.indicator_fraction=0.5"]) == 0
    out = capsys.readouterr().out
    assert str(paths.indicators_parquet) in out and "growing as bits fall" in out


@pytest.mark.parametrize("override, message", [
    ("resources.num_workers=0", "num_workers"),
    ("indicators.bits=[6,4,9]", "outside 2..8"),
    ("indicators.bits=[6,4,4]", "duplicates"),
    ("indicators.bits=[6,4,1]", "outside 2..8"),
    ("resources.use_gpu=true", "GPU"),
])
def test_bad_input_is_one_line_exit_2(ray_local, tmp_path, capsys, override, message):
    extra = ["baselines.uniform=[[4,4]]", "search.bitops=[w4a4]"] if "bits" in override else []
    code = main(["indicators", DEFAULT, f"study.dir={tmp_path}", override, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and message in err and "\n" not in err


def test_corrupt_checkpoint_names_the_file(ray_local, tmp_path, capsys):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"this is not a torch file")
    code = main(["indicators", DEFAULT, f"study.dir={tmp_path / 's'}", f"model.checkpoint={bad}"])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "corrupt" in err
    cfg = _cfg(tmp_path / "s2", f"model.checkpoint={bad}")
    with pytest.raises(UserError, match="corrupt"):
        run_indicators(cfg, StudyPaths(cfg.study_dir), bad)


def test_import_reference_resnet50(tmp_path):
    ref = REFERENCE / "limpq_resnet50.json"
    if not ref.exists():
        pytest.skip(f"{ref} not present")
    cfg = _cfg(tmp_path, "model.name=resnet50", "data.name=imagenet", f"data.root={tmp_path / 'none'}",
               f"indicators.import_path={ref}")
    paths = StudyPaths(cfg.study_dir)
    res = run_indicators(cfg, paths, None)
    assert res.imported and paths.indicators_parquet.exists() and paths.indicators_json.exists()
    raw = json.loads(ref.read_text())
    assert len(res.indicators.layers) == len(raw["layers"])
    assert {f.name for f in res.indicators.fixed} == {"conv1", "fc"}
    assert Indicators.load(paths.indicators_parquet).to_json_dict() == res.indicators.to_json_dict()

    # the same file against the wrong model names the mismatching layers
    cfg18 = _cfg(tmp_path / "r18", "model.name=resnet18", "data.name=imagenet", f"data.root={tmp_path / 'none'}",
                 f"indicators.import_path={ref}")
    with pytest.raises(UserError, match=r"missing .*unknown layer1\.0\.conv3"):
        run_indicators(cfg18, StudyPaths(cfg18.study_dir), None)
