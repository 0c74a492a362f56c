"""Config: typed loading, overrides, one clear error per bad key or value, shipped configs valid."""
import re
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import config_from_dict, load_config
from orchestrator.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate_and_name_their_command(path):
    text = path.read_text()
    assert f"mpqsweep run configs/{path.name}" in text.split("\n\n")[0] or f"configs/{path.name}" in text[:600]
    extra = ["model.weights=/ckpt/fp.pth"] if "mobilenet_v1" in path.name else []
    load_config(path, [] if "default" in path.name else ["data.root=/data", *extra])


def test_imagenet_and_cifar_need_weights_unless_pretraining_is_asked_for(tmp_path):
    cfg = ROOT / "configs/imagenet_resnet18.yaml"
    with pytest.raises(UserError, match="data imagenet needs pretrained weights: set model.weights"):
        load_config(cfg, ["data.root=/data", "model.weights=null"])
    assert load_config(cfg, ["data.root=/data", "model.weights=null", "pretrain.epochs=3"]).model.weights is None
    bare = tmp_path / "cifar.yaml"
    bare.write_text("model: {name: resnet20}\ndata: {name: cifar10, root: /data}\nsearch: {bitops: [w4a4]}\n")
    with pytest.raises(UserError, match="data cifar10 needs pretrained weights"):
        load_config(bare)
    for old in ("model.checkpoint=/x.pt", "model.torchvision_weights=ResNet18_Weights.IMAGENET1K_V1"):
        with pytest.raises(UserError, match=re.escape(f"config: {old.split('=')[0]} is now model.weights")):
            load_config(ROOT / "configs/default.yaml", [old])


def test_overrides_and_round_trip():
    cfg = load_config(ROOT / "configs/default.yaml", ["indicators.epochs=1", "search.alpha=[1.5, 2]",
                                                      "finetune.lr=2.5e-3", "tracking.on_unreachable=continue"])
    assert cfg.indicators.epochs == 1 and cfg.search.alpha == [1.5, 2.0] and cfg.finetune.lr == 0.0025
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override,message", [
    ("indicators.epoch=2", "unknown key indicators.epoch (did you mean 'epochs'?)"),
    ("indicators.bits=[6,4,4]", "has duplicates"),
    ("indicators.bits=[9,4]", "outside 2..8"),
    ("resources.num_workers=0", "resources.num_workers must be >= 1"),
    ("finetune.lr=fast", "finetune.lr must be a number"),
    ("resources.use_gpu=maybe", "must be true or false"),
    ("tracking.on_unreachable=ignore", "must be one of"),
    ("model.name=vgg", "model.name 'vgg' is unknown"),
    ("data.name=cifar10", "data.root is required"),
    ("search.bits=[[6,7]]", "uses bits that have no indicators"),
    ("search.alpha=[-1]", "search.alpha"),
    ("nonsense", "is not key=value"),
])
def test_bad_values_are_one_clear_error(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(ROOT / "configs/default.yaml", [override])


def test_cli_exit_code_2_and_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: {name: x}\nindicatorz: {}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config: unknown key indicatorz")
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    (tmp_path / "broken.yaml").write_text("study: [unclosed\n")
    assert main(["run", str(tmp_path / "broken.yaml")]) == 2
    assert not any(p.name.startswith("studies") for p in tmp_path.iterdir())
