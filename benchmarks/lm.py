"""Language-model benchmarks on held-out files of the Python standard library (byte tokens, CPU, one process).

``--part kd``: token-level knowledge distillation. A GPT-style teacher (``LanguageModel``, 4 blocks, width 128) is
trained once (or loaded from ``--teacher-checkpoint``); a student with about 1/8 of its parameters (2 blocks, width
56) is trained for the same steps on the same batches (one ``TextDataModule``, data seed 0: same file split, same
window order) twice per seed: alone (next-token cross-entropy) and distilled (``DistillationModule``: ``alpha`` x
T^2-scaled KL to the teacher + (1 - alpha) x cross-entropy, per token). Reported: test-split perplexity of the
teacher, of the students alone and distilled (mean over ``--seeds``, the seed sets the student's initialisation),
and the fraction of the teacher-student gap that distillation closes: ``(ppl_alone - ppl_kd) / (ppl_alone -
ppl_teacher)``. Goal (issue #13): >= 30%.

``--part prune``: a dense decoder (``--prune-shape``, default 2 blocks, width 64) is trained ``--steps`` steps per
seed; then, from that same dense model: the dense model trained ``--ft-steps`` more steps (the dense reference, same
total steps), one-shot global magnitude pruning to 50% unstructured and magnitude 2:4 (no fine-tuning), and ours:
the ``Pruning`` callback over the same ``--ft-steps`` (50% unstructured: cubic ramp over the first 70% of them,
global magnitude; 2:4: a ramp from 1 to 2 zeros a group of 4 at 35%, then fixed), the same Linear weights in every
case (every ``nn.Linear`` of the decoder, the head included). Reported: test perplexity, mean over ``--seeds``, and
each pruned model's increase over the dense reference. Goals (issue #13): 50% unstructured within 5% of dense, 2:4
within 15%, ours ahead of one-shot magnitude.

``--part int8``: a decoder (``--int8-shape``, default 4 blocks, width 128) is trained ``--steps`` steps (or loaded
from ``--checkpoint``); its Linear layers are quantized with torchao (``int8_dynamic``: int8 weights per channel and
activations per token; ``int8_weight_only``), then compiled with inductor (weights frozen), as the quantization
callbacks deploy them. Reported: test perplexity of each against fp32, and prefill / decode tokens per second at
batch 1 and 8 against fp32 eager (and fp32 compiled), measured side by side in interleaved rounds with
``lightning_opt.reporting.language_model_figures`` (decode: greedy, one forward pass per token over a sliding window
of ``--context`` tokens, no key/value cache). Goals: perplexity within 1%, decode >= 1.5x fp32 eager.

Usage:
    python benchmarks/lm.py --part kd             # seeds 0 1 2 (~12 min at 1 thread, 2 shared cores)
    python benchmarks/lm.py --part kd --steps 20 --teacher-steps 20 --seeds 0 --test-batches 2   # smoke run
    python benchmarks/lm.py --part prune --steps 1500 --ft-steps 500
    python benchmarks/lm.py --part prune --steps 20 --ft-steps 10 --seeds 0 --test-batches 2     # smoke run
    python benchmarks/lm.py --part int8 --steps 1000
    python benchmarks/lm.py --part int8 --steps 10 --test-batches 2 --rounds 1                  # smoke run
"""

from __future__ import annotations

import argparse
import copy
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
from lightning_opt.pruning import Pruning, apply_masks, nm_masks, unstructured_masks
from lightning_opt.quantization import linear
from lightning_opt.reporting import language_model_figures
from lightning_opt.schedules import LinearSchedule, PolynomialSchedule
from lightning_opt.text import TextDataModule

TEACHER = {"layers": 4, "width": 128, "heads": 4}
STUDENT = {"layers": 2, "width": 56, "heads": 4}


def trainer(steps: int, test_batches: int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return pl.Trainer(
        callbacks=callbacks,
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


def fit(
    module: pl.LightningModule,
    steps: int,
    args: argparse.Namespace,
    save: str | None = None,
    callbacks: list[pl.Callback] | None = None,
) -> float:
    start = time.perf_counter()
    t = trainer(steps, args.test_batches, callbacks)
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


def shape_of(text: str) -> dict[str, int]:
    layers, width, heads = (int(v) for v in text.split("x"))
    return {"layers": layers, "width": width, "heads": heads}


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def one_shot(dense: LanguageModel, names: list[str], granularity: str) -> LanguageModel:
    """A copy of ``dense`` with the magnitude masks of ``granularity`` applied once (global 50% or 2:4)."""
    model = copy.deepcopy(dense)
    params = dict(model.named_parameters())
    scores = {n: params[n].detach().abs() for n in names}
    ones = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    if granularity == "unstructured":
        masks = unstructured_masks(scores, ones, [(names, 0.5)])
    else:
        masks = {n: nm_masks(scores[n], ones[n], 2, 4, 2) for n in names}
    apply_masks(model, masks)
    return model


def part_prune(args: argparse.Namespace) -> None:
    shape = shape_of(args.prune_shape)
    results: dict[str, list[float]] = {}
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)
        dense = lm(shape, args)
        secs = fit(dense, args.steps, args)
        start_ppl = test_ppl(dense, args)
        row = {"dense (trained --steps)": start_ppl}
        reference = copy.deepcopy(dense)
        reference.hparams.lr = args.ft_lr
        fit(reference, args.ft_steps, args)
        row["dense"] = test_ppl(reference, args)
        for granularity in ("unstructured", "nm"):
            label = "50%" if granularity == "unstructured" else "2:4"
            ours = copy.deepcopy(dense)
            ours.hparams.lr = args.ft_lr
            if granularity == "unstructured":
                schedule = PolynomialSchedule(final=0.5, start=0.0, end=0.7, frequency=max(1, args.ft_steps // 20))
            else:
                schedule = LinearSchedule(initial=0.25, final=0.5, start=0.0, end=0.35, frequency=1)
            cb = Pruning(schedule, granularity=granularity, remask="foreach", log_histograms=False)  # type: ignore[arg-type]
            fit(ours, args.ft_steps, args, callbacks=[cb])
            row[f"ours {label}"] = test_ppl(ours, args)
            row[f"one-shot {label}"] = test_ppl(one_shot(dense, sorted(cb.masks), granularity), args)
        for k, v in row.items():
            results.setdefault(k, []).append(v)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in row.items())
        print(f"seed {seed} ({secs:.0f} s dense): {shown}", flush=True)
    n = count_parameters(lm(shape, args))
    print(
        f"\nPruning, {args.prune_shape} decoder ({n:,} params), {args.steps} dense steps + {args.ft_steps} steps "
        f"(lr {args.ft_lr}), batch {args.batch_size} x context {args.context}, test ppl over {args.test_batches} "
        f"batches, seeds {args.seeds}:"
    )
    dense_ppl = statistics.mean(results["dense"])
    goals = {"ours 50%": 0.05, "ours 2:4": 0.15}
    for k, values in results.items():
        mean = statistics.mean(values)
        line = f"  {k:24s} {mean:8.3f} +- {sd(values):.3f}   {(mean - dense_ppl) / dense_ppl:+7.2%} vs dense"
        if k in goals:
            line += f"  (goal <= +{goals[k]:.0%}: {'met' if mean <= dense_ppl * (1 + goals[k]) else 'NOT met'})"
        print(line)
    for label in ("50%", "2:4"):
        ours, oneshot = statistics.mean(results[f"ours {label}"]), statistics.mean(results[f"one-shot {label}"])
        print(
            f"  ours {label} ahead of one-shot magnitude: {'yes' if ours < oneshot else 'NO'} "
            f"({ours:.3f} vs {oneshot:.3f})"
        )


def part_int8(args: argparse.Namespace) -> None:
    shape = shape_of(args.int8_shape)
    pl.seed_everything(0, verbose=False)
    if args.checkpoint:
        fp32 = LanguageModel.load_from_checkpoint(args.checkpoint, map_location="cpu")
        print(f"model: {args.checkpoint}")
    else:
        fp32 = lm(shape, args)
        secs = fit(fp32, args.steps, args)
        print(
            f"model: {args.int8_shape} ({count_parameters(fp32):,} params) trained {args.steps} steps in {secs:.0f} s"
        )
    fp32.eval()
    dm = data(args)
    dm.setup()
    batches = []
    for batch in dm.test_dataloader():
        batches.append((batch[0], batch[1]))
        if len(batches) >= args.test_batches:
            break
    variants: dict[str, tuple[torch.nn.Module, bool]] = {"fp32 eager": (fp32, False), "fp32 compiled": (fp32, True)}
    for scheme in linear.SCHEMES:
        q = copy.deepcopy(fp32)
        linear.quantize(q.backbone, scheme)
        variants[f"{scheme} compiled"] = (q, True)
    if args.eager_int8:
        for scheme in linear.SCHEMES:
            variants[f"{scheme} eager"] = (variants[f"{scheme} compiled"][0], False)
    ppl = {name: language_model_figures(m, batches, 1, 1, repeats=1)["lm_ppl"] for name, (m, _) in variants.items()}
    speed: dict[tuple[str, int], list[dict[str, float]]] = {}
    for batch_size in (1, 8):
        one = batches[:1]
        for _ in range(args.rounds):  # interleaved rounds: machine noise hits every variant alike
            for name, (m, compiled) in variants.items():
                figures = language_model_figures(
                    m, one, args.decode_tokens, batch_size, args.threads, repeats=3, compile=compiled
                )
                speed.setdefault((name, batch_size), []).append(figures)
    print(
        f"\nint8 ({args.int8_shape} decoder, context {args.context}, {args.threads} thread(s), test ppl over "
        f"{args.test_batches} batches of {args.batch_size}; tokens/s: median of {args.rounds} interleaved rounds, each "
        f"the median of 3 runs; decode {args.decode_tokens} greedy tokens, one forward pass per token):"
    )
    base_ppl = ppl["fp32 eager"]
    print(
        f"  {'':22s} {'test ppl':>9s} {'change':>8s}"
        + "".join(f"  {'prefill b' + str(b):>12s}  {'decode b' + str(b):>12s}" for b in (1, 8))
    )
    for name in variants:
        cells = ""
        for b in (1, 8):
            runs = speed[(name, b)]
            pre = statistics.median(r["prefill_tokens_per_s"] for r in runs)
            dec = statistics.median(r["decode_tokens_per_s"] for r in runs)
            base = speed[("fp32 eager", b)]
            pre0 = statistics.median(r["prefill_tokens_per_s"] for r in base)
            dec0 = statistics.median(r["decode_tokens_per_s"] for r in base)
            cells += f"  {pre:7.0f} {pre / pre0:4.2f}x  {dec:7.0f} {dec / dec0:4.2f}x"
        print(f"  {name:22s} {ppl[name]:9.4f} {(ppl[name] - base_ppl) / base_ppl:+8.3%}{cells}")
    print("  goals: perplexity within 1% of fp32, decode >= 1.5x fp32 eager at batch 1 and 8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["kd", "prune", "int8"], default="kd")
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
    parser.add_argument("--prune-shape", default="2x64x4", help="layers x width x heads of the pruned decoder")
    parser.add_argument("--ft-steps", type=int, default=500, help="fine-tuning steps while pruning (prune)")
    parser.add_argument("--ft-lr", type=float, default=1e-3, help="peak learning rate of those steps (prune)")
    parser.add_argument("--int8-shape", default="4x128x4", help="layers x width x heads of the int8 decoder")
    parser.add_argument("--checkpoint", default=None, help="a LanguageModel checkpoint to quantize (int8)")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eager-int8", action="store_true", help="also time the int8 models uncompiled (int8)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part == "kd":
        part_kd(args)
    elif args.part == "prune":
        part_prune(args)
    else:
        part_int8(args)


if __name__ == "__main__":
    main()
