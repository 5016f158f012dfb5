"""Search benchmark: samplers at equal trial budgets, trial pruning's saved compute, and the loop's overhead.

On the small-CNN space of digits (depth 1-3, width and kernel size per block, learning rate, batch size), each
trial a real Lightning fit through ``lightning_opt.search.run_search``:

1. random vs TPE, one objective (val/acc), over several seeds: best value at the budget;
2. random vs NSGA-II, two objectives (val/acc up, measured latency down): hypervolume of each study's front,
   computed with optuna's hypervolume util against one reference point for all studies;
3. TPE with and without the median trial pruner: total training steps and best value;
4. the share of each trial's wall time spent outside ``trainer.fit`` (building, measuring, bookkeeping).

Runs are interleaved (seed by seed, one sampler then the other) in one process with one torch thread, so the
machine's noise falls on both sides alike.

Example:
    python benchmarks/search.py --seeds 0 1 2 --trials 16 --epochs 4
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
import yaml
from optuna._hypervolume import compute_hypervolume
from optuna.trial import TrialState
from rich.console import Console

from lightning_opt.search import counted_trials, run_search

BASE: dict[str, Any] = {
    "seed_everything": 0,
    "model": {
        "class_path": "lightning_opt.module.ImageClassifier",
        "init_args": {
            "backbone": "small_cnn",
            "num_classes": 10,
            "in_channels": 1,
            "input_size": 8,
            "backbone_kwargs": {"channels": [16, 32], "kernel_sizes": [3, 3]},
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.003}},
        },
    },
    "data": {"class_path": "lightning_opt.data.DigitsDataModule", "init_args": {"batch_size": 64, "seed": 0}},
    "trainer": {"max_epochs": 4, "accelerator": "cpu", "devices": 1, "enable_checkpointing": False},
}
SPACE: dict[str, Any] = {
    "model.init_args.optimizer.init_args.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "model.init_args.backbone_kwargs.channels": {
        "type": "list",
        "length": [1, 3],
        "item": {"type": "int", "low": 8, "high": 64, "step": 8},
    },
    "model.init_args.backbone_kwargs.kernel_sizes": {
        "type": "list",
        "length": "model.init_args.backbone_kwargs.channels",
        "item": {"choices": [3, 5]},
    },
    "data.init_args.batch_size": [32, 64, 128],
}


WALL: list[tuple[float, float]] = []  # (sum of fit seconds, wall seconds of run_search) per study


def study(workdir: Path, name: str, epochs: int, trials: int, seed: int, search: dict[str, Any]) -> optuna.Study:
    recipe = copy.deepcopy(BASE)
    recipe["trainer"]["max_epochs"] = epochs
    recipe["search"] = {
        "space": SPACE,
        "n_trials": trials,
        "seed": seed,
        "study_name": name,
        "run_dir": str(workdir / name),
        **search,
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    start = time.perf_counter()
    result = run_search(path, console=Console(file=io.StringIO()))
    wall = time.perf_counter() - start
    WALL.append((sum(float(t.user_attrs.get("fit_seconds", 0.0)) for t in result.study.trials), wall))
    return result.study


def best(st: optuna.Study) -> float:
    return max(t.values[0] for t in st.get_trials(states=(TrialState.COMPLETE,)))


def steps(st: optuna.Study) -> int:
    return sum(int(t.user_attrs.get("steps", 0)) for t in counted_trials(st.trials))


def outside_share(st: optuna.Study) -> list[float]:
    """Per completed trial: 1 - fit time / wall time from ``ask`` to ``tell`` (sampling, building, storage)."""
    out = []
    for t in st.get_trials(states=(TrialState.COMPLETE,)):
        fit = t.user_attrs.get("fit_seconds")
        total = (t.datetime_complete - t.datetime_start).total_seconds()
        if fit is not None and total > 0:
            out.append(1.0 - fit / total)
    return out


def losses(st: optuna.Study) -> np.ndarray:
    """(1 - val/acc, latency_ms) of the completed trials: both to minimize."""
    return np.array([[1.0 - t.values[0], t.values[1]] for t in st.get_trials(states=(TrialState.COMPLETE,))])


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--parts", nargs="+", default=["single", "multi", "pruning"])
    parser.add_argument("--out", type=Path, default=None, help="write the raw figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="lightning_opt_search_bench_"))
    started = time.time()
    raw: dict[str, Any] = {"seeds": args.seeds, "trials": args.trials, "epochs": args.epochs, "threads": 1}
    shares: list[float] = []  # per trial, from the single-objective and unpruned studies (no latency measurement)
    print(f"digits small-CNN space, {args.trials} trials a study, {args.epochs} epochs a trial, seeds {args.seeds},")
    print("torch threads 1, studies interleaved seed by seed")

    if "single" in args.parts:
        res: dict[str, list[float]] = {"random": [], "tpe": []}
        for seed in args.seeds:
            for sampler in ("random", "tpe"):
                kwargs = {"name": "tpe", "n_startup_trials": 5} if sampler == "tpe" else "random"
                st = study(workdir, f"single_{sampler}_{seed}", args.epochs, args.trials, seed, {"sampler": kwargs})
                res[sampler].append(best(st))
                shares += outside_share(st)
                print(f"  seed {seed} {sampler:6s} best val/acc {res[sampler][-1]:.4f}", flush=True)
        raw["single"] = res
        wins = sum(t > r for t, r in zip(res["tpe"], res["random"]))
        print(
            f"[1] best val/acc at {args.trials} trials: random {mean_std(res['random'])}, TPE {mean_std(res['tpe'])};"
            f" TPE better on {wins}/{len(args.seeds)} seeds"
        )

    if "multi" in args.parts:
        fronts: dict[str, list[np.ndarray]] = {"random": [], "nsga2": []}
        for seed in args.seeds:
            for sampler in ("random", "nsga2"):
                kwargs = {"name": "nsga2", "population_size": 6} if sampler == "nsga2" else "random"
                st = study(
                    workdir,
                    f"multi_{sampler}_{seed}",
                    args.epochs,
                    args.trials,
                    seed,
                    {
                        "sampler": kwargs,
                        "objectives": [
                            {"name": "val/acc", "direction": "maximize"},
                            {"name": "latency_ms", "direction": "minimize"},
                        ],
                        "latency": {"batch_size": 64, "repeats": 20, "warmup": 3},
                    },
                )
                fronts[sampler].append(losses(st))
                print(f"  seed {seed} {sampler:6s} {len(fronts[sampler][-1])} completed", flush=True)
        # one reference point for every study: worst accuracy (1 - 0) and the slowest latency seen, plus 10%
        worst_latency = max(float(f[:, 1].max()) for fs in fronts.values() for f in fs)
        ref = np.array([1.0, worst_latency * 1.1])
        hv = {k: [compute_hypervolume(f, ref) for f in fs] for k, fs in fronts.items()}
        raw["multi"] = {"hypervolume": hv, "reference_point": ref.tolist()}
        wins = sum(n > r for n, r in zip(hv["nsga2"], hv["random"]))
        print(
            f"[2] hypervolume of (1 - val/acc, latency_ms) at {args.trials} trials, reference {ref.round(3).tolist()}:"
            f" random {mean_std(hv['random'])}, NSGA-II {mean_std(hv['nsga2'])}; NSGA-II better on"
            f" {wins}/{len(args.seeds)} seeds"
        )

    if "pruning" in args.parts:
        res_p: dict[str, dict[str, list[float]]] = {
            "none": {"best": [], "steps": []},
            "median": {"best": [], "steps": []},
        }
        for seed in args.seeds:
            for pruner in ("none", "median"):
                search: dict[str, Any] = {"sampler": {"name": "tpe", "n_startup_trials": 5}}
                if pruner == "median":
                    search["pruner"] = {"name": "median", "n_startup_trials": 4, "n_warmup_steps": 1}
                st = study(workdir, f"prune_{pruner}_{seed}", args.epochs, args.trials, seed, search)
                res_p[pruner]["best"].append(best(st))
                res_p[pruner]["steps"].append(steps(st))
                if pruner == "none":
                    shares += outside_share(st)
                n_pruned = len(st.get_trials(states=(TrialState.PRUNED,)))
                print(
                    f"  seed {seed} pruner {pruner:6s} best {res_p[pruner]['best'][-1]:.4f}"
                    f" steps {res_p[pruner]['steps'][-1]} pruned {n_pruned}",
                    flush=True,
                )
        raw["pruning"] = res_p
        saved = [1.0 - m / n for m, n in zip(res_p["median"]["steps"], res_p["none"]["steps"])]
        print(
            f"[3] TPE, {args.trials} trials: total training steps without pruning {mean_std(res_p['none']['steps'])},"
            f" with the median pruner {mean_std(res_p['median']['steps'])} ({statistics.mean(saved):.1%} saved);"
            f" best val/acc {mean_std(res_p['none']['best'])} vs {mean_std(res_p['median']['best'])}"
        )

    if shares:
        raw["outside_training_share"] = {"mean": statistics.mean(shares), "max": max(shares), "n": len(shares)}
        print(
            f"[4] share of trial wall time outside trainer.fit: mean {statistics.mean(shares):.1%},"
            f" median {statistics.median(shares):.1%}, max {max(shares):.1%} over {len(shares)} trials"
        )
        fit_total, wall_total = sum(f for f, _ in WALL), sum(w for _, w in WALL)
        raw["outside_training_share_of_search"] = 1.0 - fit_total / wall_total
        print(
            f"    whole searches (validation, trials, waiting, outputs): {1.0 - fit_total / wall_total:.1%} of"
            f" {wall_total:.0f} s outside trainer.fit"
        )
    print(f"total {time.time() - started:.0f} s; studies in {workdir}")
    if args.out:
        args.out.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
