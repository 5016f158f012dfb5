"""Every recipe under recipes/ runs through the real CLI, shrunk by the overrides on its `# Test:` line."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_opt.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
README = RECIPES.parent / "README.md"
ALL = sorted(RECIPES.rglob("*.yaml"))

# What README.md's "What you see" promises each recipe's TensorBoard run, in one place. A tag is a scalar unless it
# says its kind (`text:`, `image:`, `histogram:`, `hparam:` a setting of the run's HParams session); `<...>` stands
# for any name (`<monitor>` and `<test metric>`: the recipe's `report:` metrics); the tags of a technique that name a
# `<layer>` must name the same layers. test_promised_tags_are_the_readmes checks that each is written in the README.
CLASSIFIER = ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc")
LANGUAGE = ("train/loss", "val/loss", "test/loss", "val/ppl", "val/bpb", "test/ppl", "test/bpb", "text:val/sample")
REPORT = (
    "text:compression_report",
    "report/<stage>/<figure>",
    "hp/<monitor>",
    "hp/<test metric>",
    "hp/nonzero_params_ratio",
    "hp/size_bytes_ratio",
    "hp/latency_ms_ratio",
    "hparam:model",
    "hparam:model/<argument>",
)
PRUNING = (
    "pruning/target",
    "pruning/sparsity",
    "pruning/nonzeros",
    "pruning/layer_sparsity/<layer>",
    "histogram:pruning/weights/<layer>",
    "text:pruning/layers",
    "image:pruning/layer_sparsity",
    "hparam:Pruning/schedule.final",
    "hparam:Pruning/granularity",
    "hparam:Pruning/criterion",
)
QAT = (
    "quant/scale/<layer>",
    "quant/zero_point/<layer>",
    "quant/weight_scale/<layer>",
    "quant/sqnr_db/<layer>",
    "quant/int8/test_acc",
    "quant/int8/fp32_test_acc",
    "quant/int8/latency_ms",
    "quant/int8/speedup_vs_fp32",
    "hparam:QuantizationAwareTraining/start",
    "hparam:QuantizationAwareTraining/scheme",
)
DISTILLATION = (
    "train/hard_loss",
    "train/soft_loss",
    "train/teacher_acc",
    "train/agreement",
    "val/agreement",
    "val/teacher_acc",
    "hparam:DistillationModule/alpha",
    "hparam:DistillationModule/temperature",
)
#: A search: each trial's run (`trial:`) and the `summary` run (`summary:`); `<objective>`: each of its objectives.
SEARCH = ("trial:hp/<objective>", "trial:hp/steps", "trial:hp/trial_seconds", "trial:hparam:state")
SEARCH_SUMMARY = ("summary:image:search/history",)
PROMISED: dict[str, tuple[str, ...]] = {
    "quickstart.yaml": CLASSIFIER + REPORT,
    "tabular_mlp.yaml": CLASSIFIER + REPORT,
    "distillation/teacher_digits.yaml": CLASSIFIER + REPORT,
    "distillation/teacher_transfer_digits.yaml": CLASSIFIER + REPORT,
    "distillation/distill_digits.yaml": CLASSIFIER + REPORT + DISTILLATION,
    "distillation/distill_transfer_digits.yaml": CLASSIFIER + REPORT + DISTILLATION,
    "distillation/distill_prune_qat_digits.yaml": CLASSIFIER + REPORT + DISTILLATION + PRUNING + QAT,
    "pruning/gmp_digits.yaml": CLASSIFIER + REPORT + PRUNING,
    "pruning/nm_2_4.yaml": CLASSIFIER + REPORT + PRUNING,
    "pruning/channel_resnet.yaml": CLASSIFIER + REPORT + PRUNING + ("text:pruning/channel_removal",),
    "quantization/qat_digits.yaml": CLASSIFIER + REPORT + QAT,
    "quantization/qat_tiny_resnet.yaml": CLASSIFIER + REPORT + QAT,
    "lm/teacher.yaml": LANGUAGE + REPORT,
    "lm/student.yaml": LANGUAGE + REPORT,
    "lm/distill.yaml": LANGUAGE + REPORT + DISTILLATION,
    "lm/compress.yaml": LANGUAGE + REPORT + DISTILLATION + PRUNING + ("text:pruning/channel_removal",),
    "plan/prune_mnist_compact.yaml": CLASSIFIER + REPORT + PRUNING,
    "search/hpo_digits.yaml": SEARCH + SEARCH_SUMMARY,
    "search/nas_digits.yaml": SEARCH + SEARCH_SUMMARY + ("summary:image:search/pareto_front",),
    "search/joint_width_sparsity_digits.yaml": SEARCH + SEARCH_SUMMARY + ("summary:image:search/pareto_front",),
}


def _header(path: Path, field: str) -> str | None:
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.lstrip("# ").startswith(f"{field}:"):
            return line.lstrip("# ")[len(field) + 1 :].strip()
    return None


def test_recipes_exist():
    assert (RECIPES / "quickstart.yaml") in ALL


def _what_you_see() -> str:
    text = README.read_text()
    return text[text.index("## What you see") : text.index("\n## ", text.index("## What you see") + 1)]


def test_promised_tags_are_the_readmes():
    """The table above is the README's list: every tag it checks is written in "What you see", and every recipe has
    its row."""
    section = _what_you_see()
    for tags in PROMISED.values():
        for tag in tags:
            name = tag.split(":")[-1]
            assert f"`{name}`" in section, f"{name!r} is checked but README.md's 'What you see' does not list it"
    assert set(PROMISED) == {str(p.relative_to(RECIPES)) for p in ALL}


def _read_run(run: Path) -> dict[str, Any]:
    """Everything TensorBoard shows of one run (a folder of event files): tags by kind, scalar values, sessions."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0, "images": 1, "histograms": 1})
    acc.Reload()
    tags = acc.Tags()
    out: dict[str, Any] = {
        "scalar": set(tags["scalars"]),
        "text": {t.removesuffix("/text_summary") for t in tags["tensors"]},
        "image": set(tags["images"]),
        "histogram": set(tags["histograms"]),
        "values": {t: [e.value for e in acc.Scalars(t)] for t in tags["scalars"]},
        "hparam": set(),
        "sessions": 0,
    }
    try:
        content = acc.PluginTagToContent("hparams").get("_hparams_/session_start_info")
    except KeyError:  # no HParams data in this run
        content = None
    if content is not None:
        out["hparam"] = set(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)
    for file in sorted(run.glob("*tfevents*")):  # every session ever written, not only the one TensorBoard keeps
        for event in LegacyEventFileLoader(str(file)).Load():
            out["sessions"] += sum(v.tag == "_hparams_/session_start_info" for v in event.summary.value)
    return out


def _matching(pattern: str, names: set[str]) -> dict[str, str]:
    """The names that ``pattern`` (``<...>``: any non-empty text) matches, each with what its ``<layer>`` stands for."""
    regex = re.compile(
        "".join(
            "(?P<layer>.+)" if part == "<layer>" else ".+" if part.startswith("<") else re.escape(part)
            for part in re.split(r"(<[^>]+>)", pattern)
        )
    )
    found = {}
    for name in names:
        match = regex.fullmatch(name)
        if match:
            found[name] = match.groupdict().get("layer") or ""
    return found


def _check_promised(run: Path, promised: list[str], substitutions: dict[str, str], label: str) -> dict[str, Any]:
    seen = _read_run(run)
    layers: dict[str, dict[str, set[str]]] = {}
    for tag in promised:
        *kinds, pattern = tag.split(":")
        kind = kinds[0] if kinds else "scalar"
        for placeholder, value in substitutions.items():
            pattern = pattern.replace(placeholder, value)
        found = _matching(pattern, seen[kind])
        assert found, f"{label}: README.md promises the {kind} {pattern!r}, not in {run} ({sorted(seen[kind])})"
        if "<layer>" in pattern:
            layers.setdefault(pattern.split("/")[0], {})[f"{kind}:{pattern}"] = set(found.values())
    for technique, by_tag in layers.items():  # one layer name across a technique's tags
        assert len({frozenset(v) for v in by_tag.values()}) == 1, (
            f"{label}: {technique} tags name other layers: {by_tag}"
        )
    return seen


def _check_fit_run(recipe: Path, root: Path) -> None:
    runs = sorted({p.parent for p in root.rglob("*tfevents*")})
    assert len(runs) == 1, f"a fit writes one TensorBoard run, got {runs}"
    config = yaml.safe_load(recipe.read_text()) or {}
    report = config.get("report") or {}
    substitutions = {
        "<monitor>": report.get("monitor", "val/acc"),
        "<test metric>": report.get("test_metric", "test/acc"),
    }
    label = str(recipe.relative_to(RECIPES))
    seen = _check_promised(runs[0], list(PROMISED[label]), substitutions, label)
    # TensorBoard opens on the run's own groups: no `epoch`, no `hp_metric = -1`, every scalar in a group
    assert "epoch" not in seen["scalar"]
    assert -1.0 not in seen["values"].get("hp_metric", [])
    assert all("/" in tag for tag in seen["scalar"]), sorted(t for t in seen["scalar"] if "/" not in t)
    assert seen["sessions"] == 1, f"one HParams session per run, got {seen['sessions']}"
    monitor = substitutions["<monitor>"]
    assert seen["values"][f"hp/{monitor}"][-1] == pytest.approx(seen["values"][f"report/final/{monitor}"][-1])


def _check_search_run(recipe: Path, root: Path) -> None:
    config = yaml.safe_load(recipe.read_text()) or {}
    objectives = [o["name"] for o in config["search"]["objectives"]]
    runs = sorted({p.parent for p in root.rglob("*tfevents*")})
    trials = [r for r in runs if r.parent.name == "trials"]
    assert runs == sorted([*trials, *(r for r in runs if r.name == "summary")]), (
        "trial runs and a summary, nothing else"
    )
    assert len([r for r in runs if r.name == "summary"]) == 1
    label = str(recipe.relative_to(RECIPES))
    promised = PROMISED[label]
    for run in trials:
        trial = [t.removeprefix("trial:") for t in promised if t.startswith("trial:")]
        for objective in objectives:
            seen = _check_promised(run, trial, {"<objective>": objective}, label)
            assert seen["sessions"] == 1, f"{run}: one HParams session per trial, got {seen['sessions']}"
            assert "val/acc" in seen["scalar"], "the trial's own curves are in its run"
    summary = [t.removeprefix("summary:") for t in promised if t.startswith("summary:")]
    _check_promised(next(r for r in runs if r.name == "summary"), summary, {}, label)


@pytest.mark.parametrize("recipe", ALL, ids=[str(p.relative_to(RECIPES)) for p in ALL])
def test_recipe_runs_shrunk(recipe, tmp_path, monkeypatch):
    """Each recipe runs through the real CLI, shrunk, and its TensorBoard run holds every tag README.md promises."""
    run = _header(recipe, "Run")
    test = _header(recipe, "Test")
    assert run and run.startswith("lightning-opt "), f"{recipe} must open with a '# Run: lightning-opt ...' line"
    assert test is not None, f"{recipe} must have a '# Test: <overrides>' line that shrinks it"
    words = shlex.split(run)[1:]
    words = [str(RECIPES.parent / w) if w.startswith("recipes/") else w for w in words]
    test_args = [a.replace("{tmp}", str(tmp_path)) for a in shlex.split(test)]
    monkeypatch.chdir(tmp_path)
    fit = ["--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1"]  # a step logged in 2 batches
    main([*words, *test_args, *([] if words[0] != "fit" else fit)])
    if words[0] == "fit":
        reports = list((tmp_path / "runs").rglob("report.json"))
        assert reports, "a fit recipe writes its compression report under runs/"
        assert "final" in json.loads(reports[0].read_text())["stages"]
        _check_fit_run(recipe, tmp_path / "runs")
    elif words[0] == "search":
        _check_search_run(recipe, tmp_path / "runs")


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("recipe", "stages", "files"),
    [
        ("pruning/channel_resnet.yaml", {"pruned (masked)", "channels removed", "final"}, {"pruned_model.pt"}),
        ("distillation/distill_prune_qat_digits.yaml", {"baseline", "int8", "final"}, {"int8.pt2", "student.ckpt"}),
    ],
)
def test_recipe_under_plain_ddp(recipe, stages, files, tmp_path):
    """`lightning-opt fit` with strategy=ddp on 2 CPU processes (each rank launched as a script, as on a cluster).

    Rank-zero-only writers (the report, the thin model, the int8 artifact) must not enter collectives that the other
    rank never joins: before that was fixed these runs hung at the end of fit.
    """
    path = RECIPES / recipe
    args = [a.replace("{tmp}", str(tmp_path)) for a in shlex.split(_header(path, "Test") or "")]
    cmd = [sys.executable, "-m", "lightning_opt", "fit", "--config", str(path), *args]
    cmd += ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in proc.stdout + proc.stderr  # two processes really ran
    (report,) = (tmp_path / "runs").rglob("report.json")
    assert stages <= set(json.loads(report.read_text())["stages"])
    assert files <= {p.name for p in report.parent.iterdir()}


@pytest.mark.parametrize("recipe", ALL, ids=[str(p.relative_to(RECIPES)) for p in ALL])
def test_last_ckpt_is_the_latest_state(recipe):
    """Lightning writes `last.ckpt` only when a monitored checkpoint improves: a recipe that monitors a metric must
    keep a separate unmonitored `save_last` checkpoint, so that resuming from last.ckpt never goes back epochs."""
    import yaml

    config = yaml.safe_load(recipe.read_text()) or {}
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    checkpoints = [
        c.get("init_args") or {} for c in callbacks if str(c.get("class_path", "")).endswith("ModelCheckpoint")
    ]
    for args in checkpoints:
        assert not (args.get("monitor") and args.get("save_last")), f"{recipe}: save_last on a monitored checkpoint"
    if any(args.get("monitor") for args in checkpoints) and any(a.get("save_last") is not None for a in checkpoints):
        assert any(a.get("save_last") and not a.get("monitor") for a in checkpoints)
