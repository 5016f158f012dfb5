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


def test_labeled_size_marks_a_seeded_stratified_transfer_set():
    full = DigitsDataModule(seed=0)
    a, b, c = (DigitsDataModule(seed=s, labeled_size=100) for s in (0, 0, 1))
    for dm in (full, a, b, c):
        dm.setup()
    x_full, y_full = full._splits["train"].tensors
    x_a, y_a = a._splits["train"].tensors
    assert torch.equal(x_a, x_full)  # every training image stays, in the same order
    labeled = y_a != -1
    assert int(labeled.sum()) == 100 and int((y_a == -1).sum()) == len(y_a) - 100
    assert torch.equal(y_a[labeled], y_full[labeled])  # kept labels are the true ones
    assert torch.bincount(y_a[labeled], minlength=10).tolist() == [10] * 10  # stratified: 10 of each class
    assert torch.equal(y_a, b._splits["train"].tensors[1])  # seeded
    assert not torch.equal(labeled, c._splits["train"].tensors[1] != -1)  # another seed, another sample
    for split in ("val", "test"):  # only the training split loses labels
        assert torch.equal(a._splits[split].tensors[1], full._splits[split].tensors[1])
    assert (_labels(a.train_dataloader()) == -1).sum() == len(y_a) - 100


def test_labeled_size_equal_to_the_train_size_keeps_every_label():
    full = DigitsDataModule()
    full.setup()
    n = len(full._splits["train"])
    dm = DigitsDataModule(labeled_size=n)
    dm.setup()
    assert torch.equal(dm._splits["train"].tensors[1], full._splits["train"].tensors[1])


def test_mnist5k_labeled_size():
    dm = MNIST5kDataModule(labeled_size=500, return_index=True)
    dm.setup()
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and idx.shape == (64,)
    labels = dm._splits["train"].tensors[1]
    assert torch.bincount(labels[labels != -1], minlength=10).tolist() == [50] * 10


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (DigitsDataModule, {"labeled_size": 5}, r"`labeled_size` must be an integer >= the number of classes \(10\)"),
        (MNIST5kDataModule, {"labeled_size": 0}, r"`labeled_size` must be an integer >= the number of classes"),
        (MNIST5kDataModule, {"labeled_size": 3501}, r"must be <= the number of training images \(3500\)"),
    ],
)
def test_labeled_size_rejects_bad_values(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_labeled_size_above_the_digits_train_split_fails_at_setup():
    dm = DigitsDataModule(labeled_size=5000)
    with pytest.raises(ValueError, match=r"`labeled_size` must be <= the number of training images \(\d+\), got 5000"):
        dm.setup()


def _write_idx(path, array) -> None:
    import struct

    import numpy as np

    data = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, data.ndim) + struct.pack(f">{data.ndim}I", *data.shape)
    path.write_bytes(header + data.tobytes())


def test_torchvision_datamodule_reads_a_local_root(tmp_path):
    """MNIST files in the standard layout under `root` (tiny ones here) are split, shifted and batched."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 30), ("t10k", 12)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=gen).numpy())
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", (torch.arange(n) % 10).numpy())
    dm = TorchvisionDataModule("MNIST", root=str(tmp_path), batch_size=8, val_size=10, augment_shift=2)
    dm.setup()
    assert [len(dm._splits[s]) for s in ("train", "val", "test")] == [20, 10, 12]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28)
    assert y.dtype == torch.long
    assert len(dm.test_dataloader().dataset) == 12


def test_loaded_splits_are_shared_in_process_but_each_instance_owns_its_tensors(monkeypatch):
    from lightning_opt import data

    monkeypatch.setattr(data, "_SPLIT_CACHE", {})
    calls = []
    load = DigitsDataModule._load_splits

    def counting(self):
        calls.append(self.seed)
        return load(self)

    monkeypatch.setattr(DigitsDataModule, "_load_splits", counting)
    first, second = DigitsDataModule(seed=0), DigitsDataModule(seed=0, batch_size=32)
    other_seed = DigitsDataModule(seed=1)
    for dm in (first, second, other_seed):
        dm.setup()
    assert calls == [0, 1]  # the second seed-0 instance (a search's next trial) reuses the loaded split
    x1, y1 = first.train_dataloader().dataset.tensors
    x2, y2 = second.train_dataloader().dataset.tensors
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, other_seed.train_dataloader().dataset.tensors[0])
    x1.zero_()  # one instance changing its data in place does not reach another's
    assert x2.abs().sum() > 0
    third = DigitsDataModule(seed=0)
    third.setup()
    assert torch.equal(third.train_dataloader().dataset.tensors[0], x2)
