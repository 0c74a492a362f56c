"""The shipped ImageNet and CIFAR configs take `model.weights`: a torchvision weights name from the
local torch hub cache, or a state-dict file in torchvision's, {'model': ...} or DDP-prefixed form. Each is
resolved and loaded into the config's model before anything starts; a file that does not fit is one
clear error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.preflight import check_weights, record_weights
from workloads.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, config: str, *overrides: str):
    return load_config(ROOT / "configs" / config, [f"study.dir={tmp_path / 'study'}", *overrides])


def _check_and_record(cfg) -> None:
    """What a study does with model.weights before anything starts."""
    path = check_weights(cfg)
    record_weights(cfg.study_dir, cfg, path)


def test_resnet50_config_reads_torchvision_weights_from_the_hub_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cfg = _cfg(tmp_path, "imagenet_resnet50.yaml", f"data.root={tmp_path / 'no-data'}")  # 1000 classes
    with pytest.raises(UserError, match="resnet50-0676ba61.pth"):
        check_weights(cfg)
    path = tmp_path / "th" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    _check_and_record(cfg)
    assert (tmp_path / "study" / "weights.json").read_text().count(str(path)) == 1


@pytest.mark.parametrize("config,model,classes,wrap", [
    ("imagenet_mobilenet_v1.yaml", "mobilenet_v1", 1000, "ddp"),
    ("cifar10_resnet20.yaml", "resnet20", 10, "model"),
    ("imagenet_resnet18.yaml", "resnet18", 1000, "plain"),
])
def test_configs_take_a_state_dict_file(tmp_path, config, model, classes, wrap):
    state = build_model(model, classes).state_dict()
    if wrap == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save({"model": state} if wrap == "model" else state, tmp_path / "fp.pth")
    cfg = _cfg(tmp_path, config, f"data.root={tmp_path / 'no-data'}", f"model.weights={tmp_path / 'fp.pth'}")
    _check_and_record(cfg)
    assert '"sha1"' in (tmp_path / "study" / "weights.json").read_text()


def test_weights_that_do_not_fit_the_data_are_one_clear_error(tmp_path):
    torch.save(build_model("resnet20", 100).state_dict(), tmp_path / "c100.pth")  # a CIFAR-100 head
    cfg = _cfg(tmp_path, "cifar10_resnet20.yaml", f"data.root={tmp_path}", f"model.weights={tmp_path / 'c100.pth'}")
    with pytest.raises(UserError, match=r"does not fit the model: size mismatch for fc.weight"):
        check_weights(cfg)
