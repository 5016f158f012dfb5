from __future__ import annotations

import pytest
import torch

from lightning_opt.data import DigitsDataModule, MNIST5kDataModule, TabularDataModule, TorchvisionDataModule


def _labels(loader) -> torch.Tensor:
    return torch.cat([batch[1] for batch in loader])


def test_digits_split_is_seeded_stratified_and_disjoint():
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup()
    x_a = a.test_dataloader().dataset.tensors[0]
    assert torch.equal(x_a, b.test_dataloader().dataset.tensors[0])
    assert not torch.equal(x_a, c.test_dataloader().dataset.tensors[0])
    sizes = [len(a._splits[s]) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and sizes[2] == 360
    counts = torch.bincount(_labels(a.test_dataloader()), minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 of each class
    batch = next(iter(a.train_dataloader()))
    assert batch[0].shape == (64, 1, 8, 8) and batch[0].min() >= 0.0 and batch[0].max() <= 1.0


def test_digits_resize_augment_and_indices():
    dm = DigitsDataModule(image_size=16, augment_shift=2, return_index=True, batch_size=8)
    dm.setup()
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 16, 16) and idx.shape == (8,)
    originals = dm._splits["train"].tensors[0][idx]
    assert not torch.equal(x, originals)  # shifted
    assert torch.equal(next(iter(dm.val_dataloader()))[0], dm._splits["val"].tensors[0][:8])  # val never shifted


def test_mnist5k_split_sizes():
    dm = MNIST5kDataModule()
    dm.setup()
    assert [len(dm._splits[s]) for s in ("train", "val", "test")] == [3500, 500, 1000]
    assert dm.input_shape == (1, 28, 28)


@pytest.mark.parametrize(("name", "features", "classes"), [("iris", 4, 3), ("wine", 13, 3), ("breast_cancer", 30, 2)])
def test_tabular_sets_are_standardized(name, features, classes):
    dm = TabularDataModule(name)
    dm.setup()
    x = dm._splits["train"].tensors[0]
    assert x.shape[1] == features and dm.num_classes == classes
    assert torch.allclose(x.mean(0), torch.zeros(features), atol=1e-4)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (DigitsDataModule, {"val_size": 1.5}, r"`val_size` must be a fraction in \(0, 1\), got 1.5"),
        (DigitsDataModule, {"batch_size": 0}, "`batch_size` must be >= 1, got 0"),
        (DigitsDataModule, {"augment_shift": -1}, "`augment_shift` must be >= 0"),
        (TabularDataModule, {"dataset": "titanic"}, "`dataset` must be one of"),
        (TorchvisionDataModule, {"dataset": "SVHN"}, "`dataset` must be one of"),
    ],
)
def test_datamodules_reject_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_torchvision_missing_root_names_path_and_download(tmp_path):
    root = tmp_path / "nothing-here"
    with pytest.raises(
        FileNotFoundError, match=r"MNIST files were not found under root=.*nothing-here.*download: true"
    ):
        TorchvisionDataModule("MNIST", root=str(root))
    assert not root.exists()  # nothing half-written
