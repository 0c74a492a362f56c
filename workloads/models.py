"""Model zoo by name: torchvision ImageNet CNNs, MobileNetV1, CIFAR ResNet-20 and a small CNN.

Weights come from a state-dict file (``weights_only=True``); a torchvision weights name resolves to
its file in the local torch hub cache (``resolve_weights``). Nothing is downloaded.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError


class SmallCNN(nn.Module):
    """The embedded default's model: 6 convs + fc, enough layers for a search to mean something."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        w = width

        def block(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, w),
            *block(w, 2 * w, 2),
            *block(2 * w, 2 * w),
            *block(2 * w, 4 * w, 2),
            *block(4 * w, 4 * w),
            *block(4 * w, 4 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class _BasicBlockCifar(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetCifar(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers); n=3 is ResNet-20 (0.27 M params)."""

    def __init__(self, n: int = 3, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlockCifar(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017), width 1.0, for 224x224 ImageNet."""

    CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
           (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()

        def c(ch):
            return max(8, int(ch * width_mult))

        def conv_bn(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        def dw_sep(cin, cout, stride):
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        layers, cin = [conv_bn(in_channels, c(32), 2)], c(32)
        for cout, stride in self.CFG:
            layers.append(dw_sep(cin, c(cout), stride))
            cin = c(cout)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _tv(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        import torchvision  # here: importing it costs seconds in every worker that never builds one

        if in_channels != 3:
            raise InputError(f"{name} takes 3-channel input")
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    return build


def hub_checkpoint_dir() -> Path:
    """Where torchvision keeps downloaded weights: ``$TORCH_HOME/hub/checkpoints`` by default."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(spec: str, model_name: str | None = None) -> Path:
    """The state-dict file that ``model.weights`` names: a torchvision weights name
    (``ResNet50_Weights.IMAGENET1K_V1``), looked up in the local torch hub cache under torchvision's own
    file name and never downloaded, or a path to a state-dict file."""
    path = Path(spec).expanduser()
    if path.exists() or "/" in spec or "_Weights." not in spec:
        if not path.is_file():
            raise InputError(f"model.weights: {path} is not a file (give a state-dict file or a torchvision "
                             "weights name such as ResNet50_Weights.IMAGENET1K_V1)")
        return path.resolve()
    import torchvision

    try:
        enum = torchvision.models.get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        raise InputError(f"model.weights: {spec!r} is not a torchvision weights name "
                         "(e.g. ResNet50_Weights.IMAGENET1K_V1) nor an existing file") from None
    if model_name is not None and model_name not in TORCHVISION:
        raise InputError(f"model.weights: {model_name} is not a torchvision model; give a state-dict file")
    if model_name is not None:
        expected = torchvision.models.get_model_weights(model_name)
        if type(enum) is not expected:
            raise InputError(f"model.weights: {spec} are not weights for {model_name} (those are "
                             f"{expected.__name__}.*)")
    cache = hub_checkpoint_dir() / Path(enum.url).name
    if not cache.is_file():
        raise InputError(f"model.weights: {spec} is not in the local torch hub cache: no file {cache} "
                         f"(nothing is downloaded; copy {enum.url} there, or set TORCH_HOME)")
    return cache


REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{n: _tv(n) for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                           "resnext50_32x4d", "resnext101_32x8d", "mobilenet_v2")},
    "mobilenet_v1": lambda num_classes=1000, in_channels=3: MobileNetV1(num_classes, in_channels),
    "resnet20": lambda num_classes=10, in_channels=3: ResNetCifar(3, num_classes, in_channels),
    "small_cnn": lambda num_classes=10, in_channels=1: SmallCNN(num_classes, in_channels),
}
TORCHVISION = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
               "resnext101_32x8d", "mobilenet_v2"}


def build_model(name: str, num_classes: int, in_channels: int | None = None,
                checkpoint: str | None = None) -> nn.Module:
    if name not in REGISTRY:
        raise InputError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    kwargs = {}
    if in_channels is not None:  # else the model's own default (1 for small_cnn, 3 for the rest)
        kwargs["in_channels"] = in_channels
    model = REGISTRY[name](num_classes=num_classes, **kwargs)
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load an FP state dict saved with torch.save — torchvision's own files, ``{'model': state_dict}``
    and DDP's ``module.``-prefixed keys alike; tensors only (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise InputError(f"checkpoint {path} is corrupt or not a torch state dict ({type(e).__name__})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches, e.g. a 1000-class head for a 10-class data set
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise InputError(f"checkpoint {path} does not fit the model: {detail}") from None
    if missing or unexpected:
        raise InputError(f"checkpoint {path} does not fit the model: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
