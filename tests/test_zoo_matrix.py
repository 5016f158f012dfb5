"""The model-zoo matrix: every zoo architecture through every technique, as a user runs it.

A cell passes when it *works* (the technique's own result checked, see ``lightning_opt/testing/matrix.py``) or is
*refused* before training with a message; a *crash* or a *silent* wrong result fails. Known failures, being fixed on
other branches, are listed once in `KNOWN_FAILURES` (strict xfail: a fixed cell fails the suite until its row is
deleted).

Quick cells run in the default suite. The slow cells (int8 conversion, export, Torch-Pruning's graph: about half an
hour for the 13 architectures on 2 cores) carry the ``zoo`` marker, which the default run deselects: the suite keeps
their hard cases in ``tests/pruning/test_pruning_zoo.py`` and ``tests/quantization/test_quant_zoo.py``, and the
whole matrix runs with ``python -m pytest -m zoo tests/test_zoo_matrix.py`` or ``python benchmarks/zoo.py``, which
writes ``docs/support.md``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_opt.testing import matrix
from lightning_opt.testing.matrix import QUICK_TECHNIQUES, SLOW_TECHNIQUES, TECHNIQUES, run_cell
from lightning_opt.testing.zoo import ZOO, available

pytest.importorskip("onnxruntime")

# (model, technique) -> why it fails today. Delete a row once the fix is merged: strict xfail makes it fail then.
# Empty: every cell works or is refused at setup with a message (the demo Transformer's int8/ONNX capture).
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _cells() -> list[pytest.ParameterSet]:
    params = []
    for model in ZOO:
        for technique in TECHNIQUES:
            marks: list[pytest.MarkDecorator] = []
            if technique in SLOW_TECHNIQUES:
                marks += [pytest.mark.slow, pytest.mark.zoo]
            if (model, technique) in KNOWN_FAILURES:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(model, technique)]))
            if not available(model):
                marks.append(pytest.mark.skip(reason=f"needs {', '.join(ZOO[model].requires)} (the zoo extra)"))
            params.append(pytest.param(model, technique, marks=marks, id=f"{model}-{technique}"))
    return params


@pytest.mark.parametrize(("model", "technique"), _cells())
def test_zoo_cell_works_or_is_refused_before_training(model: str, technique: str, tmp_path) -> None:
    cell = run_cell(model, technique, tmp_path)
    assert cell.status in ("works", "refused"), f"{model} x {technique}: {cell.status}: {cell.message}"
    if cell.status == "refused":
        assert cell.message.split(": ", 1)[1], "a refusal must say why"


def test_known_failures_name_real_cells() -> None:
    assert set(QUICK_TECHNIQUES) | set(SLOW_TECHNIQUES) == set(TECHNIQUES)
    unknown = [cell for cell in KNOWN_FAILURES if cell[0] not in ZOO or cell[1] not in TECHNIQUES]
    assert not unknown


def test_run_cell_rejects_unknown_model_and_technique(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"`model` must be one of \[.*'vit'.*\], got 'alexnet'"):
        run_cell("alexnet", "report", tmp_path)
    with pytest.raises(ValueError, match=r"`technique` must be one of \[.*'qat'.*\], got 'lora'"):
        run_cell("resnet18", "lora", tmp_path)


class _FailsAtStep(Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == 1:
            raise KeyError("backbone.lm_head.weight")


def _builder(callbacks: list[Callback], check: Any = None) -> Any:
    def build(name: str, root: str, measure: bool, threads: int) -> Any:
        model = matrix.ZooModule(name)
        return matrix._Run(model, callbacks, check or (lambda trainer: {}))

    return build


def test_cells_are_classified_refused_crash_silent(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_opt.pruning import ConstantSchedule, Pruning

    refusing = Pruning(schedule=ConstantSchedule(final=0.5), include="no_such_layer")
    monkeypatch.setitem(matrix._BUILDERS, "report", _builder([refusing]))
    cell = run_cell("demo_transformer", "report", tmp_path / "refused")
    assert (cell.status, cell.message.split(":")[0]) == ("refused", "ValueError")

    monkeypatch.setitem(matrix._BUILDERS, "report", _builder([_FailsAtStep()]))
    cell = run_cell("demo_transformer", "report", tmp_path / "crash")
    assert cell.status == "crash"
    assert cell.message == "in training step 1: KeyError: 'backbone.lm_head.weight'"

    def wrong(trainer: pl.Trainer) -> dict[str, float]:
        raise matrix._CheckFailed("outputs differ by 0.31")

    monkeypatch.setitem(matrix._BUILDERS, "report", _builder([], wrong))
    cell = run_cell("demo_transformer", "report", tmp_path / "silent")
    assert (cell.status, cell.message) == ("silent", "outputs differ by 0.31")
