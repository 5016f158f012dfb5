"""What a search leaves behind: summary table, CSV, best configs, each trial's TensorBoard HParams session, plots."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from lightning_opt._io import atomic_path, atomic_write
from lightning_opt.loggers import hparam_value, write_session_file
from lightning_opt.search._results import SearchResult, counted_trials
from lightning_opt.search._space import SearchSpace
from lightning_opt.search._spec import SearchConfig

__all__ = ["pareto_front", "write_outputs"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def pareto_front(trials: list[FrozenTrial], directions: list[str]) -> list[FrozenTrial]:
    """The non-dominated completed trials, ordered by the first objective (best first).

    Args:
        trials: Completed trials.
        directions: ``"maximize"``/``"minimize"`` per objective.

    Examples:
        >>> import optuna
        >>> ts = [optuna.trial.create_trial(values=v) for v in ([1.0, 1.0], [1.0, 2.0], [0.5, 0.5])]
        >>> [t.values for t in pareto_front(ts, ["maximize", "minimize"])]
        [[1.0, 1.0], [0.5, 0.5]]
    """
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    losses = [[s * v for s, v in zip(signs, t.values)] for t in trials]
    front = []
    for i, li in enumerate(losses):
        dominated = any(
            all(a <= b for a, b in zip(lj, li)) and any(a < b for a, b in zip(lj, li))
            for j, lj in enumerate(losses)
            if j != i
        )
        if not dominated:
            front.append(trials[i])
    seen: set[tuple[float, ...]] = set()
    unique = []
    for t in sorted(front, key=lambda t: signs[0] * t.values[0]):
        key = tuple(t.values)
        if key not in seen:  # the same point twice (a retried trial) is one member of the front
            seen.add(key)
            unique.append(t)
    return unique


def _rows(trials: list[FrozenTrial], config: SearchConfig, front: set[int]) -> tuple[list[str], list[dict[str, Any]]]:
    names = [o.name for o in config.objectives]
    keys = config.space.keys
    header = ["number", "state", *names, *keys, "pareto", "steps", "fit_seconds", "trial_seconds"]
    header += ["outside_training_share", "fail_reason", "trial_dir"]
    retried_as = {int(t.system_attrs["failed_trial"]): t.number for t in trials if "failed_trial" in t.system_attrs}
    rows = []
    for t in trials:
        params = config.space.decode_params(t.params)
        fit_s, total_s = t.user_attrs.get("fit_seconds"), t.user_attrs.get("trial_seconds")
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        for i, name in enumerate(names):
            row[name] = t.values[i] if t.values is not None else None
        for key in keys:
            row[key] = json.dumps(params[key]) if isinstance(params.get(key), list | dict) else params.get(key)
        row["pareto"] = t.number in front
        row["steps"] = t.user_attrs.get("steps")
        row["fit_seconds"] = fit_s
        row["trial_seconds"] = total_s
        row["outside_training_share"] = round(1.0 - fit_s / total_s, 4) if fit_s is not None and total_s else None
        row["fail_reason"] = t.user_attrs.get("fail_reason", "") or _lost_reason(t, retried_as)
        row["trial_dir"] = t.user_attrs.get("trial_dir", "")
        rows.append(row)
    return header, rows


def _lost_reason(trial: FrozenTrial, retried_as: dict[int, int]) -> str:
    """Why a failed trial that recorded no reason failed: its worker stopped sending heartbeats (killed, lost)."""
    if trial.state != TrialState.FAIL:
        return ""
    worker = trial.user_attrs.get("worker", "its worker")
    reason = f"worker lost: {worker} stopped sending heartbeats (killed or disconnected)"
    if trial.number in retried_as:
        reason += f"; retried as trial {retried_as[trial.number]}"
    return reason


def _best_yaml(path: Path, trial: FrozenTrial, config: SearchConfig, recipe: dict[str, Any]) -> Path:
    values = config.space.decode_params(trial.params)
    best = SearchSpace.apply(recipe, values)
    objectives = ", ".join(f"{o.name}={v:.6g}" for o, v in zip(config.objectives, trial.values))
    header = (
        f"# Trial {trial.number} of search study {config.study_name!r}: {objectives}.\n"
        f"# Searched values: {json.dumps(values)}\n"
        f"# Run: lightning-opt fit --config {path}\n"
    )
    with atomic_write(path) as fh:
        fh.write(header + yaml.safe_dump(best, sort_keys=False))
    return path


def _plot_history(trials: list[FrozenTrial], config: SearchConfig) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obj = config.objectives[0]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [t.number for t in done]
    ys = [t.values[0] for t in done]
    ax.scatter(xs, ys, s=18, label="completed trial", color="tab:blue")
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
            s=14,
            marker="x",
            color="tab:gray",
            label="pruned (last reported)",
        )
    best, best_xs, best_ys = None, [], []
    for x, y in sorted(zip(xs, ys)):
        if best is None or (y > best if obj.direction == "maximize" else y < best):
            best = y
        best_xs.append(x)
        best_ys.append(best)
    ax.step(best_xs, best_ys, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(obj.name)
    ax.set_title(f"{config.study_name}: {obj.name} ({obj.direction})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def _plot_pareto(trials: list[FrozenTrial], front: list[FrozenTrial], config: SearchConfig) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ox, oy = config.objectives[0], config.objectives[1]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], s=18, color="tab:gray", label="trial")
    pts = sorted((t.values[1], t.values[0], t.number) for t in front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:red", label="Pareto front")
    for x, y, n in pts:
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    xs = [t.values[1] for t in done]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 10:  # e.g. latencies of pruned and unpruned models
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"{oy.name} ({oy.direction})")
    ax.set_ylabel(f"{ox.name} ({ox.direction})")
    ax.set_title(f"{config.study_name}: Pareto front of {len(done)} trials")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def _tensorboard(trials: list[FrozenTrial], config: SearchConfig, figures: dict[str, Any], run_dir: Path) -> Path:
    """Each trial's HParams session in the trial's own run, the plots in the ``summary`` run.

    A trial's session (its searched values and state) and its ``hp/`` scalars (objectives, steps, seconds: the
    HParams tab's metric columns) go into ``trials/trial_NNNN/hparams.tfevents``, beside its training curves, so that
    a search of N trials is N + 1 TensorBoard runs.
    """
    from torch.utils.tensorboard import SummaryWriter

    names = [o.name for o in config.objectives]
    for t in trials:
        trial_dir = t.user_attrs.get("trial_dir")
        if not trial_dir or not Path(trial_dir).is_dir():
            continue
        params = config.space.decode_params(t.params)
        hparams: dict[str, Any] = {k: hparam_value(v) for k, v in params.items()}
        hparams["state"] = t.state.name
        metrics: dict[str, float] = {}
        if t.values is not None:
            metrics.update({f"hp/{n}": float(v) for n, v in zip(names, t.values)})
        elif t.intermediate_values:
            metrics[f"hp/{names[0]}"] = float(t.intermediate_values[max(t.intermediate_values)])
        for extra in ("steps", "trial_seconds"):
            if t.user_attrs.get(extra) is not None:
                metrics[f"hp/{extra}"] = float(t.user_attrs[extra])
        write_session_file(trial_dir, hparams, metrics, step=int(t.user_attrs.get("steps") or 0))
    shutil.rmtree(run_dir / "hparams", ignore_errors=True)  # the separate HParams runs of earlier versions
    summary_dir = run_dir / f".summary.{os.getpid()}"
    shutil.rmtree(summary_dir, ignore_errors=True)
    with SummaryWriter(log_dir=str(summary_dir)) as writer:
        for tag, fig in figures.items():
            writer.add_figure(f"search/{tag}", fig, close=False)
    _swap_in(summary_dir, run_dir / "summary")
    return run_dir


def _swap_in(new: Path, target: Path) -> None:
    """Replace directory ``target`` by ``new`` (renames only, so a reader never sees a half-written directory)."""
    old = target.with_name(f".{target.name}.old.{os.getpid()}")
    try:
        if target.exists():
            target.rename(old)
        new.rename(target)
    except OSError:  # another worker swapped its own copy in meanwhile: keep theirs
        shutil.rmtree(new, ignore_errors=True)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_outputs(
    study: optuna.Study, config: SearchConfig, recipe: dict[str, Any], console: Console | None = None
) -> SearchResult:
    """Write the summary table, ``trials.csv``, ``best*.yaml``, plots and TensorBoard views of a study.

    Args:
        study: The (finished) study.
        config: Its search section.
        recipe: The recipe without ``search`` (the base of the best configs).
        console: Where the summary table goes (``None``: a fresh console).

    Returns:
        The search result with the paths written.
    """
    import matplotlib.pyplot as plt

    console = console or Console()
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    every = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not t.user_attrs.get("skipped")]
    trials = [t for t in counted_trials(every) if t.state.is_finished()]
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    multi = len(config.objectives) > 1
    result = SearchResult(study=study, config=config)

    if completed:
        if multi:
            result.best_trials = pareto_front(completed, config.directions)
        else:
            sign = 1.0 if config.directions[0] == "minimize" else -1.0
            result.best_trials = [min(completed, key=lambda t: sign * t.values[0])]
    front_numbers = {t.number for t in result.best_trials}

    for i, t in enumerate(result.best_trials):
        name = "best.yaml" if i == 0 else f"best_trial_{t.number:04d}.yaml"
        result.best_configs.append(_best_yaml(run_dir / name, t, config, recipe))
    for old in set(run_dir.glob("best*.yaml")) - set(result.best_configs):  # replaced, then stale ones removed
        old.unlink(missing_ok=True)

    header, csv_rows = _rows(every, config, front_numbers)  # a dead worker's trial too, with why it failed
    counted = {t.number for t in trials}
    rows = [row for row in csv_rows if row["number"] in counted]
    csv_path = run_dir / "trials.csv"

    with atomic_write(csv_path, newline="") as fh:  # workers finishing together never interleave a file
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(csv_rows)
    result.files["csv"] = csv_path

    figures: dict[str, Any] = {}
    if completed:
        figures["history"] = _plot_history(trials, config)
        with atomic_path(run_dir / "history.png") as tmp:
            figures["history"].savefig(tmp, format="png")
        result.files["history_png"] = run_dir / "history.png"
        if multi:
            figures["pareto_front"] = _plot_pareto(trials, result.best_trials, config)
            with atomic_path(run_dir / "pareto.png") as tmp:
                figures["pareto_front"].savefig(tmp, format="png")
            result.files["pareto_png"] = run_dir / "pareto.png"
    if trials:
        result.files["tensorboard"] = _tensorboard(trials, config, figures, run_dir)
    for fig in figures.values():
        plt.close(fig)

    _print_summary(console, trials, config, result, rows)
    return result


def _print_summary(
    console: Console, trials: list[FrozenTrial], config: SearchConfig, result: SearchResult, rows: list[dict[str, Any]]
) -> None:
    names = [o.name for o in config.objectives]
    counts = {
        s.name: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    title = (
        f"study {config.study_name!r}: {len(trials)} trials ({counts['COMPLETE']} complete, {counts['PRUNED']} pruned,"
        f" {counts['FAIL']} failed)"
    )
    arrows = " ".join(
        f"{name} {'↑' if obj.direction == 'maximize' else '↓'} ({obj.direction}d)"
        for name, obj in zip(names, config.objectives)
    )
    caption = f"{arrows}; train steps and wall time (s) per trial; searched keys by their last part"
    table = Table(title=title, caption=caption, show_lines=False)
    table.add_column("trial", justify="right")
    table.add_column("state", no_wrap=True)
    for name, obj in zip(names, config.objectives):
        table.add_column(f"{name} {'↑' if obj.direction == 'maximize' else '↓'}", justify="right")
    leaves = [k.rsplit(".", 1)[-1] for k in config.space.keys]
    short = {
        k: leaf if leaves.count(leaf) == 1 else ".".join(k.split(".")[-2:])
        for k, leaf in zip(config.space.keys, leaves)
    }
    for key in config.space.keys:
        table.add_column(short[key], overflow="fold")
    table.add_column("train steps", justify="right")
    table.add_column("time (s)", justify="right")
    table.add_column("note", overflow="fold")
    best = {t.number for t in result.best_trials}
    signs = [1.0 if d == "minimize" else -1.0 for d in config.directions]

    def order(row: dict[str, Any]) -> tuple[int, int, float]:
        value = row[names[0]]
        return (row["number"] not in best, row["state"] != "COMPLETE", signs[0] * value if value is not None else 0.0)

    shown = sorted(rows, key=order)
    limit = 15
    for row in shown[:limit]:
        style = "bold green" if row["number"] in best else ("dim" if row["state"] != "COMPLETE" else "")
        note = row["fail_reason"] or ("best" if row["number"] in best and not len(names) > 1 else "")
        if row["number"] in best and len(names) > 1:
            note = "Pareto front"
        table.add_row(
            str(row["number"]),
            row["state"].lower(),
            *[_fmt(row[n]) if row[n] is not None else "-" for n in names],
            *[_fmt(row[k]) if row[k] is not None else "-" for k in config.space.keys],
            str(row["steps"] if row["steps"] is not None else "-"),
            _fmt(row["trial_seconds"]) if row["trial_seconds"] is not None else "-",
            note,
            style=style,
        )
    console.print(table)
    if len(shown) > limit:
        console.print(f"... {len(shown) - limit} more trials in {result.files['csv']}")
    if result.best_configs:
        console.print(f"best config: lightning-opt fit --config {result.best_configs[0]}")
        if len(result.best_configs) > 1:
            console.print(f"Pareto front configs: {', '.join(str(p) for p in result.best_configs[1:])}")
    console.print(f"TensorBoard (HParams, Pareto front, every trial): tensorboard --logdir {config.run_dir}")
    if not result.best_trials:
        console.print("[red]no trial completed.")
