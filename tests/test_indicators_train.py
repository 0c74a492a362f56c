"""Integration tests of the training stages on a real local Ray (Train V2), on the embedded default
(small CNN, MNIST 5k) with 2 DDP ranks: FP pretraining, then LIMPQ joint indicator training with one
worker killed mid-run. One pretrain and one (faulted) indicator run serve every test, because each Ray
Train run costs ~20 s of fixed start-up on 2 cores: ranks stay bit-identical, the per-step policy
schedule is Algorithm 1, the resumed run redoes nothing before its last checkpoint and replays the
steps after it exactly, indicators grow as bits fall. Then bad input (one line, exit 2) and importing
the published ResNet-50 indicators."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import ray
import torch

from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.indicators import Indicators
from orchestrator.paths import StudyPaths
from orchestrator.train_loops import CKPT_FILE, load_state, policy_generator
from orchestrator.training import run_indicators, run_pretrain
from workloads.data import load_data, subset
from workloads.errors import InputError

pytestmark = pytest.mark.ray

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
DEFAULT = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
# The embedded default, shortened: 2 FP epochs, 2 joint epochs on a quarter of the train set, 2 DDP ranks.
OVERRIDES = ["pretrain.epochs=2", "indicators.epochs=2", "data.indicator_fraction=0.25", "resources.num_workers=2",
             "resources.max_failures=2"]


@pytest.fixture(scope="module")
def ray_local():
    # Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and
    # moves on (start, restart, finish) only at a poll; 0.5 s takes ~5 s off each short run here. Ray's
    # processes inherit the variable from ray.init.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(study_dir: Path, *overrides: str, config: str | None = DEFAULT):
    return load_config(config, [f"study.dir={study_dir}", *overrides])


def _trace(d: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (d / f"rank{rank}.jsonl").read_text().splitlines()]


def _attempts(rows: list[dict]) -> list[list[dict]]:
    """A rank's trace split by process (a restarted worker is a new process), in order."""
    out: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        out[r["pid"]].append(r)
    return list(out.values())


@pytest.fixture(scope="module")
def study(ray_local, tmp_path_factory):
    """Pretrain + joint training on the embedded default, rank 1 killed in the middle of epoch 1."""
    root = tmp_path_factory.mktemp("default")
    cfg = _cfg(root / "study", *OVERRIDES)
    paths = StudyPaths(cfg.study_dir)
    pre = run_pretrain(cfg, paths, trace_dir=root / "pretrain-trace")

    # What an unfaulted run does: DistributedSampler(drop_last) shards, then whole batches only.
    data = load_data("mnist5k", val_fraction=cfg.data.val_fraction, seed=cfg.study.seed)
    per_rank = len(subset(data.train, cfg.data.indicator_fraction, cfg.study.seed)) // 2
    steps_per_epoch = per_rank // cfg.data.batch_size
    fault_step = steps_per_epoch + steps_per_epoch // 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPQ_TEST_FAULT_STEP", str(fault_step))  # rank 1 exits once it has done this many steps
        mp.setenv("MPQ_TEST_FAULT_MARKER", str(root / "fired"))
        res = run_indicators(cfg, paths, pre, trace_dir=root / "indicator-trace")
    print(f"\n[timing] pretrain wall {pre.wall_seconds:.1f}s startup {pre.startup_seconds:.1f}s; "
          f"indicators wall {res.wall_seconds:.1f}s startup (last attempt) {res.startup_seconds:.1f}s")
    return dict(cfg=cfg, paths=paths, pre=pre, res=res, root=root, steps_per_epoch=steps_per_epoch,
                fault_step=fault_step, traces=[_trace(root / "indicator-trace", r) for r in (0, 1)])


def test_pretrain_ddp_keeps_ranks_identical_and_learns(study):
    pre, root, paths = study["pre"], study["root"], study["paths"]
    r0, r1 = (_trace(root / "pretrain-trace", r) for r in (0, 1))
    assert len(r0) == len(r1) == 2
    assert [x["checksum"] for x in r0] == [x["checksum"] for x in r1]  # parameters and BN statistics
    assert pre.history[-1]["top1"] > 0.85, pre.history
    assert torch.load(paths.fp_checkpoint, weights_only=True).keys() == {"model"}
    assert pre.steps == r0[-1]["step"] > 0 and pre.attempt_starts == [0] and pre.startup_seconds > 0


def test_joint_training_keeps_ranks_identical(study):
    t0, t1 = study["traces"]
    assert len(t0) == len(t1)
    for a, b in zip(t0, t1):
        assert (a["step"], a["epoch"]) == (b["step"], b["epoch"])
        assert a["checksum"] == b["checksum"], f"ranks diverged at step {a['step']}"
    ends = [r for r in t0 if "epoch_end" in r]  # parameters and buffers, at every checkpoint
    assert [r["epoch"] for r in ends] == [0, 1]


def test_policy_schedule_is_algorithm_1(study):
    """Per step: the n candidate bits uniformly, in order, then one random policy: the step-th draw of
    the study's policy generator, also after the restart (the generator state is checkpointed)."""
    cfg, res, (t0, t1) = study["cfg"], study["res"], study["traces"]
    bits, n_layers = cfg.indicators.bits, len(res.indicators.layers)
    gen = policy_generator(cfg.study.seed)
    draws = [torch.randint(len(bits), (n_layers, 2), generator=gen).tolist() for _ in range(res.steps)]
    steps = [(a, b) for a, b in zip(t0, t1) if "policies" in a]
    assert len(steps) > res.steps  # the steps replayed after the restart are in the trace too
    for a, b in steps:
        assert a["policies"] == b["policies"]
        pols = a["policies"]
        assert len(pols) == len(bits) + 1
        for bit, (w, act) in zip(bits, pols[:-1]):
            assert w == [bit] * n_layers and act == [bit] * n_layers
        idx = draws[a["step"] - 1]
        assert pols[-1] == [[bits[i] for i, _ in idx], [bits[j] for _, j in idx]], a["step"]


def test_killed_worker_resumes_from_last_epoch_checkpoint(study):
    res, root, spe, fault = study["res"], study["root"], study["steps_per_epoch"], study["fault_step"]
    assert (root / "fired").exists(), "the fault hook never fired"
    assert res.attempt_starts == [0, 1]              # the second attempt started at epoch 1
    assert res.steps == 2 * spe                      # the optimizer steps of an unfaulted run
    assert [h["epoch"] for h in res.history] == [0, 1] and res.history[-1]["steps"] == 2 * spe
    for rank_trace in study["traces"]:
        first, second = (([r for r in a if "policies" in r]) for a in _attempts(rank_trace))
        assert [r["step"] for r in first] == list(range(1, fault + 1))  # rank 1 died after step `fault`
        # nothing before the epoch-0 checkpoint was retrained
        assert [r["step"] for r in second] == list(range(spe + 1, 2 * spe + 1))
        # the steps done twice (after the checkpoint, before the fault) came out bit-identical:
        # model, optimizer momentum, LR schedule, sampler epoch and policy generator all restored
        replayed = {r["step"]: r["checksum"] for r in second}
        overlap = [r for r in first if r["step"] > spe]
        assert len(overlap) == fault - spe > 0
        for r in overlap:
            assert replayed[r["step"]] == r["checksum"], f"step {r['step']} differs after the resume"


def test_indicators_grow_as_bits_fall_on_embedded_default(study):
    res = study["res"]
    ind = res.indicators
    grow = total = 0
    for layer in ind.layers:
        for values in (layer.weight, layer.act):
            for hi, lo in zip(ind.bits, ind.bits[1:]):
                total += 1
                grow += values[lo] > values[hi]
    print(f"indicators growing as bits fall on the embedded default: {grow}/{total} = {grow / total:.3f}")
    assert grow / total >= 0.9, f"only {grow}/{total} indicators grow as bits fall"
    assert res.history[-1]["val_top1_w6a6"] > 0.8 and res.history[-1]["val_top1_w2a2"] > 0.5, res.history


def test_indicator_outputs_written_and_stage_skipped(study, capsys):
    cfg, res, paths = study["cfg"], study["res"], study["paths"]
    assert res.indicators.bits == [6, 5, 4, 3, 2]
    assert [f.name for f in res.indicators.fixed] == ["features.0", "fc"]
    assert all(lay.macs > 0 and lay.params > 0 for lay in res.indicators.layers)
    assert Indicators.load(paths.indicators_parquet).to_json_dict() == res.indicators.to_json_dict()
    assert Indicators.load(paths.indicators_json).to_json_dict() == res.indicators.to_json_dict()
    state = torch.load(paths.indicator_model, weights_only=True)
    assert any(".step.2" in k for k in state["model"]) and state["bits"] == [6, 5, 4, 3, 2]
    assert res.metrics["steps"] == res.steps and res.metrics["restarts"] == 1 and "val_top1_w2a2" in res.metrics
    # skipped the second time, nothing retrained
    again = run_indicators(cfg, paths, None)
    assert again.skipped and again.indicators.to_json_dict() == res.indicators.to_json_dict()
    # the CLI verb on the same study: both stages done, so it only reports
    assert main(["indicators", DEFAULT, f"study.dir={cfg.study_dir}", *OVERRIDES]) == 0
    out = capsys.readouterr().out
    assert str(paths.indicators_parquet) in out and "growing as bits fall" in out


@pytest.mark.parametrize("override, message", [
    ("resources.num_workers=0", "num_workers must be >= 1"),
    ("indicators.bits=[6,4,9]", "outside 2..8: [9]"),
    ("indicators.bits=[6,4,4]", "has duplicates"),
    ("indicators.bits=[6,4,1]", "outside 2..8: [1]"),
    ("indicators.bits=six", "must be an integer"),
    ("resources.use_gpu=true", "GPU"),
])
def test_bad_input_is_one_line_exit_2(ray_local, tmp_path, capsys, override, message):
    extra = ["baselines.uniform=[[4,4]]", "search.bitops=[w4a4]"] if "bits" in override else []
    code = main(["indicators", DEFAULT, f"study.dir={tmp_path}", override, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and message in err and "\n" not in err, err


def test_corrupt_weights_name_the_file(ray_local, tmp_path, capsys):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"this is not a torch file")
    code = main(["indicators", DEFAULT, f"study.dir={tmp_path / 's'}", f"model.weights={bad}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(bad) in err and "corrupt" in err and "\n" not in err
    cfg = _cfg(tmp_path / "s2", f"model.weights={bad}")
    with pytest.raises(UserError, match="corrupt"):
        run_indicators(cfg, StudyPaths(cfg.study_dir), bad)


def test_corrupt_training_checkpoint_names_it(tmp_path):
    """What a resuming worker (and the driver, for the final state) reads from Ray Train storage."""
    d = tmp_path / "checkpoint_000001"
    d.mkdir()
    (d / CKPT_FILE).write_bytes(b"\x80\x02truncated")
    with pytest.raises(InputError, match=r"training checkpoint s3://bucket/run/checkpoint_000001 is corrupt "
                                         r"\(.*\); delete the run directory s3://bucket/run to"):
        load_state(d / CKPT_FILE, where="s3://bucket/run/checkpoint_000001")
    torch.save({"model": {}}, d / CKPT_FILE)
    with pytest.raises(InputError, match="not a checkpoint of this program"):
        load_state(d / CKPT_FILE)


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
