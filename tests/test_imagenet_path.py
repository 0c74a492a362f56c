"""The real user's path on CPU: `mpqsweep run configs/imagenet_resnet18.yaml` from torchvision's
pretrained weights, named as torchvision names them and found in the local torch hub cache (here: a
temporary TORCH_HOME holding a resnet18 state dict the test saved under torchvision's own file name),
on a tiny ImageFolder tree of generated JPEGs, with DDP over two Ray Train workers, to a complete
report. The study must have used exactly the saved weights."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 16, 4


def _image_tree(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            d = root / split / f"n0000000{c}"
            d.mkdir(parents=True)
            for i in range(n):
                # Each class its own dominant colour plus noise: learnable, not trivial.
                img = rng.integers(0, 80, (72, 72, 3), dtype=np.uint8)
                img[..., c] += 120
                Image.fromarray(img).save(d / f"img{i}.JPEG", quality=90)


@pytest.fixture(scope="module")
def imagenet_study(tmp_path_factory):
    import torchvision

    tmp = tmp_path_factory.mktemp("imagenet")
    _image_tree(tmp / "data")
    torch.manual_seed(7)
    saved = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    url_name = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    weights = tmp / "torch_home" / "hub" / "checkpoints" / url_name
    weights.parent.mkdir(parents=True)
    torch.save(saved.state_dict(), weights)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(HOME=str(tmp / "home"), TORCH_HOME=str(tmp / "torch_home"))
    study = tmp / "study"
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "configs/imagenet_resnet18.yaml",
           f"study.dir={study}", f"data.root={tmp / 'data'}", "data.image_size=64", "data.batch_size=8",
           "data.eval_batch_size=16", "data.loader_workers=0", "data.indicator_fraction=1.0",
           "data.holdout_fraction=0.25", "resources.num_cpus=3", "resources.num_workers=2",
           "resources.cpus_per_worker=1", "resources.use_gpu=false", "resources.amp=false",
           "indicators.epochs=1", "search.bitops=[w3a3..w5a5:3]", "search.compression_ratio=[none]",
           "mixquant.qem=[1,8]", "select.max_policies=2", "select.include_uniform=false",
           "finetune.epochs=1", "finetune.warmup_epochs=0", "finetune.bn_recalib_batches=2",
           "finetune.max_concurrent_trials=null"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return {"study": study, "weights": weights, "saved": saved, "out": out, "env": env, "cmd": cmd}


def test_study_used_the_cached_torchvision_weights(imagenet_study):
    from orchestrator.mixquant import CACHE_NAME, weights_fingerprint
    from workloads.quant.ptq import qe_table

    study, weights, saved = imagenet_study["study"], imagenet_study["weights"], imagenet_study["saved"]
    used = json.loads((study / "weights.json").read_text())
    assert used["weights"] == "ResNet18_Weights.IMAGENET1K_V1" and used["path"] == str(weights)
    assert used["sha1"] == hashlib.sha1(weights.read_bytes()).hexdigest()
    assert not (study / "pretrain" / "model.pt").exists()  # no pretraining: the weights were given
    # MixQuant's QE table was computed from the study's FP model: its fingerprint and values are those
    # of the saved weights (the test's own copy, not a file the study read back).
    import pyarrow.parquet as pq

    qe = pq.read_table(study / "search" / CACHE_NAME)
    layers = list(dict.fromkeys(qe.column("layer").to_pylist()))
    assert qe.schema.metadata[b"mpq.fingerprint"].decode() == weights_fingerprint(saved, layers)
    expected = qe_table(saved, layers[:2], (8, 4))
    got = {(r["layer"], r["bits"]): r["qe"] for r in qe.to_pylist()}
    for layer in layers[:2]:
        for b in (8, 4):
            # Same weights (the fingerprint above is exact); float reductions on other thread counts
            # differ in the last digits.
            assert got[(layer, b)] == pytest.approx(expected[layer][b], rel=1e-5)


def test_study_completes_with_ddp_finetunes_and_a_report(imagenet_study):
    from orchestrator.results import read_results

    study = imagenet_study["study"]
    rows = read_results(study / "results" / "results.parquet")
    ft = [r for r in rows if r["stage"] == "finetune"]
    assert len(ft) == 2 and all(r["status"] == "complete" and r["epochs"] == 1 for r in ft)
    assert all(0 <= r["top1"] <= 1 and r["val_split"].startswith("0.25 of train (n=12,") for r in ft)
    assert any(r["stage"] == "ptq" for r in rows)
    assert (study / "report" / "index.html").is_file()


def test_missing_weights_name_the_file_and_start_nothing(imagenet_study, tmp_path):
    env = {**imagenet_study["env"], "TORCH_HOME": str(tmp_path / "empty")}
    cmd = [c if not c.startswith("study.dir=") else f"study.dir={tmp_path / 's'}" for c in imagenet_study["cmd"]]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    expected = tmp_path / "empty" / "hub" / "checkpoints" / imagenet_study["weights"].name
    assert len(err) == 1 and f"no file {expected}" in err[0], out.stderr
    assert not (tmp_path / "s" / "ray").exists()  # Ray never started
