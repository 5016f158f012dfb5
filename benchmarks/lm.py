"""Language-model benchmarks on held-out files of the Python standard library (byte tokens, CPU, one process).

``--part kd``: token-level knowledge distillation. A GPT-style teacher (``LanguageModel``, 4 blocks, width 128) is
trained once (or loaded from ``--teacher-checkpoint``); a student with about 1/8 of its parameters (2 blocks, width
56) is trained for the same steps on the same batches (one ``TextDataModule``, data seed 0: same file split, same
window order) twice per seed: alone (next-token cross-entropy) and distilled (``DistillationModule``: ``alpha`` x
T^2-scaled KL to the teacher + (1 - alpha) x cross-entropy, per token). Reported: test-split perplexity of the
teacher, of the students alone and distilled (mean over ``--seeds``, the seed sets the student's initialisation),
and the fraction of the teacher-student gap that distillation closes: ``(ppl_alone - ppl_kd) / (ppl_alone -
ppl_teacher)``. Goal (issue #13): >= 30%.

Usage:
    python benchmarks/lm.py --part kd             # seeds 0 1 2 (~12 min at 1 thread, 2 shared cores)
    python benchmarks/lm.py --part kd --steps 20 --teacher-steps 20 --seeds 0 --test-batches 2   # smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lightning_opt, not an installed one

import lightning.pytorch as pl
import torch

from lightning_opt.distillation import DistillationModule
from lightning_opt.lm import LanguageModel
from lightning_opt.measure import count_parameters
from lightning_opt.text import TextDataModule

TEACHER = {"layers": 4, "width": 128, "heads": 4}
STUDENT = {"layers": 2, "width": 56, "heads": 4}


def trainer(steps: int, test_batches: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        limit_test_batches=test_batches,
        gradient_clip_val=1.0,
    )


def data(args: argparse.Namespace) -> TextDataModule:
    return TextDataModule(
        context=args.context, batch_size=args.batch_size, seed=0, max_files=args.max_files, max_tokens=args.max_tokens
    )


def lm(shape: dict[str, int], args: argparse.Namespace) -> LanguageModel:
    return LanguageModel(vocab_size=256, context=args.context, lr=args.lr, sample_tokens=0, **shape)


def test_ppl(module: pl.LightningModule, args: argparse.Namespace) -> float:
    result = trainer(1, args.test_batches).test(module, datamodule=data(args), verbose=False)
    return float(result[0]["test/ppl"])


def fit(module: pl.LightningModule, steps: int, args: argparse.Namespace, save: str | None = None) -> float:
    start = time.perf_counter()
    t = trainer(steps, args.test_batches)
    t.fit(module, datamodule=data(args))
    secs = time.perf_counter() - start
    if save:
        t.save_checkpoint(save)
    return secs


def part_kd(args: argparse.Namespace) -> None:
    pl.seed_everything(0, verbose=False)
    teacher = lm(TEACHER, args)
    if args.teacher_checkpoint:
        teacher = LanguageModel.load_from_checkpoint(args.teacher_checkpoint, map_location="cpu")
        print(f"teacher: {args.teacher_checkpoint}")
    else:
        secs = fit(teacher, args.teacher_steps, args, save=args.save_teacher)
        print(f"teacher: trained {args.teacher_steps} steps in {secs:.0f} s", flush=True)
    teacher.eval()
    t_ppl = test_ppl(teacher, args)
    n_t = count_parameters(teacher)
    n_s = count_parameters(lm(STUDENT, args))
    print(f"params: teacher {n_t:,}, student {n_s:,} (1/{n_t / n_s:.1f})")
    print(f"teacher test ppl {t_ppl:.3f}", flush=True)
    alone, distilled = [], []
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)
        student = lm(STUDENT, args)
        secs_a = fit(student, args.steps, args)
        alone.append(test_ppl(student, args))
        pl.seed_everything(seed, verbose=False)
        kd = DistillationModule(
            student=lm(STUDENT, args),
            teacher=teacher,
            alpha=args.alpha,
            temperature=args.temperature,
            kd_loss=args.kd_loss,
            log_teacher_metrics=False,
        )
        secs_k = fit(kd, args.steps, args)
        distilled.append(test_ppl(kd.student, args))
        print(
            f"seed {seed}: alone {alone[-1]:.3f} ({secs_a:.0f} s), distilled {distilled[-1]:.3f} ({secs_k:.0f} s)",
            flush=True,
        )
    a, k = statistics.mean(alone), statistics.mean(distilled)
    gap = a - t_ppl
    closed = (a - k) / gap if gap > 0 else math.nan
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    print(
        f"\nKD ({args.kd_loss}, alpha {args.alpha}, T {args.temperature}), {args.steps} steps x batch "
        f"{args.batch_size} x context {args.context}, test ppl over {args.test_batches} batches, seeds {args.seeds}:"
    )
    print(f"  teacher   {t_ppl:.3f}")
    print(f"  alone     {a:.3f} +- {sd(alone):.3f}")
    print(f"  distilled {k:.3f} +- {sd(distilled):.3f}")
    print(f"  gap closed {closed:.1%} (goal >= 30%: {'met' if closed >= 0.30 else 'NOT met'})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["kd"], default="kd")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000, help="student steps (alone and distilled)")
    parser.add_argument("--teacher-steps", type=int, default=3000)
    parser.add_argument("--teacher-checkpoint", default=None, help="a LanguageModel checkpoint (4x128 shape)")
    parser.add_argument("--save-teacher", default=None, help="write the trained teacher's checkpoint there")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-files", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--test-batches", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--kd-loss", choices=["forward_kl", "reverse_kl"], default="forward_kl")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part == "kd":
        part_kd(args)


if __name__ == "__main__":
    main()
