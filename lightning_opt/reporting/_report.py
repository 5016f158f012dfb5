from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_opt import inputs
from lightning_opt._io import atomic_write
from lightning_opt._utils import find_callback, local_log_dir
from lightning_opt.loggers import write_session
from lightning_opt.measure import count_parameters, measure_latency, measure_model, saved_size_bytes

__all__ = ["CompressionReport", "format_language_model_markdown", "format_report_markdown", "language_model_figures"]

#: Figures whose baseline / stage ratio the report states (bigger ratio = smaller or faster).
RATIO_KEYS = ("params", "nonzero_params", "size_bytes", "size_bytes_compressed", "flops", "latency_ms")

#: The ratios a run's headline shows as ``hp/<figure>_ratio``: what is left, how big, how fast.
HEADLINE_RATIOS = ("nonzero_params", "size_bytes", "latency_ms")

_LABELS = {
    "params": "parameters",
    "nonzero_params": "nonzero parameters",
    "sparsity": "sparsity",
    "size_bytes": "saved weights (bytes)",
    "size_bytes_compressed": "saved weights, zipped (bytes)",
    "flops": "FLOPs / forward",
    "latency_ms": "CPU latency (ms, median)",
    "latency_spread_ms": "CPU latency spread (ms, IQR)",
}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_report_markdown(stages: dict[str, dict[str, Any]], baseline: str = "baseline") -> str:
    """A markdown table: one row per figure, one column per stage, then each stage's ratio to the baseline.

    Examples:
        >>> print(format_report_markdown({"baseline": {"params": 100}, "final": {"params": 25}}))
        | figure | baseline | final | baseline / final |
        |---|---|---|---|
        | parameters | 100 | 25 | 4.00x |
    """
    names = list(stages)
    others = [n for n in names if n != baseline] if baseline in stages else []
    keys: list[str] = []
    for figures in stages.values():
        keys += [k for k in figures if k not in keys]
    header = ["figure", *names, *(f"{baseline} / {n}" for n in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        row = [_LABELS.get(key, key), *(_fmt(stages[n].get(key)) for n in names)]
        for n in others:
            a, b = stages[baseline].get(key), stages[n].get(key)
            if key in RATIO_KEYS and isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
                row.append(f"{a / b:.2f}x")
            else:
                row.append("")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _relative_paths(stages: dict[str, dict[str, Any]], folder: Path) -> dict[str, dict[str, Any]]:
    """The figures with every absolute path inside ``folder`` made relative to it (a run folder can be moved)."""
    root = folder.resolve()
    out: dict[str, dict[str, Any]] = {}
    for stage, figures in stages.items():
        out[stage] = {}
        for key, value in figures.items():
            if isinstance(value, str) and Path(value).is_absolute() and Path(value).resolve().is_relative_to(root):
                value = str(Path(value).resolve().relative_to(root))
            out[stage][key] = value
    return out


class CompressionReport(Callback):
    """Measures the model before and after training and writes a before/after compression report.

    At fit start the model is measured as ``baseline``; after fit (once every other callback has finished, so that
    pruned channels are removed and masks made permanent) it is measured again as ``final``, with the monitored
    metric. ``report.json`` and ``report.md`` land in the run's log directory, the table goes to TensorBoard as text
    and every figure as a scalar ``report/<stage>/<figure>``. Testing after fit adds the test metric to ``final``.

    Other callbacks add their own columns (an int8 artifact, a physically thinned model) with
    ``CompressionReport.find(trainer).add_stage(name, figures)``.

    The model is measured on its ``example_input_array`` in whatever form the model takes (a tensor, a tuple such as
    ``(input_ids, attention_mask)``, a dict of keyword inputs), with its real dtypes; a model without one is measured
    on the first row of the datamodule's first training batch. Every batched input is tiled to ``batch_size`` rows
    for timing.

    Figures: ``params``, ``nonzero_params``, ``sparsity``, ``size_bytes``, ``size_bytes_compressed``, ``flops``,
    ``latency_ms``, ``latency_spread_ms`` and the metrics (``monitor``, ``test_metric``).

    TensorBoard: once per run, when fit ends, an HParams session of the run's settings (`settings`: the model's
    class and arguments, the key arguments of each compression callback) whose metrics are the run's headline
    (`headline`, scalars under ``hp/``): the monitored metric, the test metric, and the nonzero-parameter,
    size and latency ratios of the compressed model (baseline / the last stage that measures it: ``int8``,
    ``channels removed``, else ``final``). A logger of Lightning's that logs ``hp_metric = -1`` gets ``hp_metric``
    set to the monitored metric; `lightning_opt.loggers.TensorBoardLogger` logs no ``hp_metric``.

    Args:
        monitor: The validation metric recorded with each stage.
        test_metric: The test metric recorded after ``trainer.test``.
        latency: Whether to time the model (CPU, ``num_threads`` threads).
        batch_size: Batch size of the timed input (every tensor of ``example_input_array`` tiled along dim 0).
        num_threads: Torch threads while timing.
        repeats: Timed forward passes; the median and interquartile range are reported.
        enabled: Whether to report at all (search trials turn it off to save time).
        lm_batches: For a language model (a next-token module such as `LanguageModel`, or a
            ``DistillationModule`` of one): validation batches of the *language-model section* (perplexity,
            parameters, bytes, prefill and decode tokens per second of the baseline, the final model and each
            ``.pt2`` artifact stage, see `language_model_figures`); 0 turns the section off.
        lm_decode_tokens: Tokens generated (greedy) to time the decode speed in that section.

    Raises:
        ValueError: If ``batch_size``, ``num_threads`` or ``repeats`` is < 1, ``lm_batches`` < 0 or
            ``lm_decode_tokens`` < 1.

    Examples:
        >>> report = CompressionReport(monitor="val/acc", batch_size=8)
        >>> report.add_stage("baseline", {"params": 100})
        >>> report.stages
        {'baseline': {'params': 100}}
    """

    #: The key settings a run's HParams session shows, by class name (of a callback or of the LightningModule, matched
    #: along its class hierarchy): attribute paths, shown as ``<class>/<path>``. Extend it for your own callbacks.
    SETTINGS: ClassVar[dict[str, tuple[str, ...]]] = {
        "Pruning": ("schedule.final", "granularity", "criterion", "scope", "schedule"),
        "QuantizationAwareTraining": ("start", "scheme", "module"),
        "PostTrainingQuantization": ("calibration_batches", "scheme", "module"),
        "DistillationModule": ("alpha", "temperature", "kd_loss", "student"),
    }

    def __init__(
        self,
        monitor: str = "val/acc",
        test_metric: str = "test/acc",
        latency: bool = True,
        batch_size: int = 1,
        num_threads: int = 1,
        repeats: int = 30,
        enabled: bool = True,
        lm_batches: int = 4,
        lm_decode_tokens: int = 16,
    ) -> None:
        for name, value in (
            ("batch_size", batch_size),
            ("num_threads", num_threads),
            ("repeats", repeats),
            ("lm_decode_tokens", lm_decode_tokens),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if lm_batches < 0:
            raise ValueError(f"`lm_batches` must be >= 0 (0: no language-model section), got {lm_batches}.")
        self.lm_batches = lm_batches
        self.lm_decode_tokens = lm_decode_tokens
        #: The language-model section: ``{stage: {lm_ppl, params, size_bytes, prefill/decode_tokens_per_s}}``.
        self.language_model: dict[str, dict[str, Any]] = {}
        self.monitor = monitor
        self.test_metric = test_metric
        self.latency = latency
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.repeats = repeats
        self.enabled = enabled
        self.stages: dict[str, dict[str, Any]] = {}
        self.output_dir: Path | None = None
        #: Files this callback wrote in the run, by what they hold (printed at the end of ``lightning-opt fit``).
        self.artifacts: dict[str, str] = {}
        self._sessions: set[str] = set()  # the run folders that have their HParams session

    @staticmethod
    def find(trainer: pl.Trainer) -> CompressionReport | None:
        """The trainer's enabled report callback, or None."""
        report = find_callback(trainer, CompressionReport)
        return report if report is not None and report.enabled else None

    def add_stage(self, name: str, figures: dict[str, Any]) -> None:
        """Add (or update) a column of figures; numbers are stored as plain Python values."""
        clean = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in figures.items()}
        self.stages.setdefault(name, {}).update(clean)

    def measure(self, model: torch.nn.Module, example_input: inputs.Example | None) -> dict[str, Any]:
        """Measure ``model`` the way every stage is measured.

        Args:
            model: The model (measured in eval mode on the CPU).
            example_input: A tensor, a tuple of positional tensors or a dict of keyword tensors.

        Raises:
            ValueError: If ``example_input`` holds no tensor.
        """
        if example_input is None or not inputs.is_example(example_input):
            raise ValueError(
                f"CompressionReport needs an example input to count FLOPs and time the model, got "
                f"{type(example_input).__name__}. HINT: set `self.example_input_array` in the LightningModule's "
                "__init__ (a tensor, a tuple `(input_ids, attention_mask)` or a dict of keyword inputs), or fit with a "
                "datamodule so that the first training batch is used."
            )
        return measure_model(
            model,
            example_input,
            latency=self.latency,
            repeats=self.repeats,
            num_threads=self.num_threads,
            batch_size=self.batch_size,
        )

    @staticmethod
    def example(trainer: pl.Trainer, pl_module: pl.LightningModule) -> inputs.Example | None:
        """The input every stage is measured on: ``example_input_array``, else the first row of a training batch."""
        example = inputs.module_example(pl_module)
        if example is not None:
            return example
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            return None
        example = inputs.module_example(pl_module, datamodule.train_dataloader())
        return None if example is None else inputs.first_rows(example, 1)

    def _metric(self, trainer: pl.Trainer, key: str) -> float | None:
        value = trainer.callback_metrics.get(key)
        return None if value is None else float(value)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.stages.get("baseline")}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("baseline"):  # a resumed run reports against the model it started from, not the checkpoint
            self.stages = {"baseline": dict(state_dict["baseline"])}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.global_rank != 0:
            return
        self.stages.pop("final", None)
        if "baseline" not in self.stages:  # a resumed run keeps the baseline of the run it resumes
            self.add_stage("baseline", self.measure(pl_module, self.example(trainer, pl_module)))
            self._language_model_stage(trainer, pl_module, "baseline", pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or trainer.global_rank != 0 or stage != "fit" or trainer.sanity_checking:
            return
        figures = self.measure(pl_module, self.example(trainer, pl_module))
        figures[self.monitor] = self._metric(trainer, self.monitor)
        self.add_stage("final", figures)
        self._language_model_stage(trainer, pl_module, "final", pl_module)
        for name, figures_of in self.stages.items():  # int8 artifacts written by the quantization callbacks
            artifact = figures_of.get("artifact")
            if name not in self.language_model and isinstance(artifact, str) and artifact.endswith(".pt2"):
                self._language_model_stage(trainer, pl_module, name, artifact)
        self.write(trainer)
        self.log_session(trainer, pl_module)

    # ---------------------------------------------------------------- language-model section
    def _language_model_stage(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, model: torch.nn.Module | str
    ) -> None:
        """Add ``stage`` to the language-model section when ``pl_module`` is a next-token model (else nothing)."""
        core = getattr(pl_module, "student", pl_module)  # a DistillationModule measures its student
        datamodule = getattr(trainer, "datamodule", None)
        if not self.lm_batches or datamodule is None or not isinstance(getattr(core, "context", None), int):
            return
        try:
            batches = []
            for batch in datamodule.val_dataloader():
                batches.append((batch[0], batch[1]))
                if len(batches) >= self.lm_batches:
                    break
            compiled = False
            if isinstance(model, str):
                from lightning_opt.quantization import linear

                model = linear.load_artifact(model)
                compiled = bool(self.stages.get(stage, {}).get("compiled"))  # timed as its callback timed it
            self.language_model[stage] = language_model_figures(
                model, batches, self.lm_decode_tokens, self.batch_size, self.num_threads, repeats=3, compile=compiled
            )
        except Exception as err:  # the section is an addition: never fail a finished run over it
            warnings.warn(f"CompressionReport: no language-model figures for stage {stage!r}: {err}", stacklevel=2)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.global_rank != 0 or "final" not in self.stages:
            return
        self.add_stage("final", {self.test_metric: self._metric(trainer, self.test_metric)})
        self.write(trainer)

    def ratios(self) -> dict[str, dict[str, float]]:
        """``baseline / stage`` for each stage and each size or speed figure (4.0 means four times smaller)."""
        base = self.stages.get("baseline", {})
        out: dict[str, dict[str, float]] = {}
        for name, figures in self.stages.items():
            if name == "baseline":
                continue
            out[name] = {
                k: base[k] / figures[k] for k in RATIO_KEYS if base.get(k) and isinstance(figures.get(k), (int, float))
            }
            out[name] = {k: v for k, v in out[name].items() if figures.get(k)}
        return out

    def headline(self) -> dict[str, float]:
        """The run's results that its HParams session shows, as ``hp/`` scalars.

        ``hp/<monitor>`` and ``hp/<test_metric>`` of the ``final`` stage, and ``hp/<figure>_ratio`` (baseline / stage)
        for the figures of `HEADLINE_RATIOS`, from the last stage other than ``final`` that measures the figure
        (an ``int8`` artifact, ``channels removed``), else from ``final``.

        Examples:
            >>> report = CompressionReport()
            >>> report.add_stage("baseline", {"latency_ms": 2.0, "nonzero_params": 100})
            >>> report.add_stage("int8", {"latency_ms": 1.0})
            >>> report.add_stage("final", {"latency_ms": 2.0, "nonzero_params": 25, "val/acc": 0.9})
            >>> report.headline()
            {'hp/val/acc': 0.9, 'hp/nonzero_params_ratio': 4.0, 'hp/latency_ms_ratio': 2.0}
        """
        final = self.stages.get("final", {})
        out = {
            f"hp/{key}": float(final[key])
            for key in (self.monitor, self.test_metric)
            if isinstance(final.get(key), int | float) and not isinstance(final.get(key), bool)
        }
        ratios = self.ratios()
        order = [*[name for name in ratios if name != "final"][::-1], "final"]
        for key in HEADLINE_RATIOS:
            stage = next((name for name in order if key in ratios.get(name, {})), None)
            if stage is not None:
                out[f"hp/{key}_ratio"] = float(ratios[stage][key])
        return out

    def settings(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The run's settings that its HParams session shows.

        ``model`` (the LightningModule's class), ``model/<argument>`` (its saved hyperparameters: nested class
        configurations as the class name and its arguments, two levels deep), and ``<Class>/<attribute>`` for the
        callbacks and module named in `SETTINGS` (``Pruning/schedule.final``, ``QuantizationAwareTraining/start``,
        ``DistillationModule/alpha``...). Class names sort before ``model`` in TensorBoard, so the compression settings
        are the first columns.
        """
        out: dict[str, Any] = {"model": type(pl_module).__name__}
        _flatten_hparams("model", dict(pl_module.hparams), out, depth=0)
        seen: dict[str, int] = {}
        for obj in [pl_module, *trainer.callbacks]:  # type: ignore[attr-defined]
            names = [cls.__name__ for cls in type(obj).__mro__]
            name = next((n for n in names if n in self.SETTINGS), None)
            if name is None:
                continue
            seen[name] = seen.get(name, 0) + 1
            prefix = name if seen[name] == 1 else f"{name}#{seen[name]}"
            for path in self.SETTINGS[name]:
                value: Any = obj
                for part in path.split("."):
                    value = getattr(value, part, None)
                out[f"{prefix}/{path}"] = value
                if obj is pl_module:
                    out.pop(f"model/{path}", None)  # shown once, under the technique's name
        return out

    @rank_zero_only
    def log_session(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the run's HParams session (`settings`) into each TensorBoard logger, once per run folder."""
        for logger in trainer.loggers:
            folder = str(getattr(logger, "log_dir", None) or local_log_dir(trainer))
            if folder in self._sessions:
                continue
            experiment = getattr(logger, "experiment", None)
            if write_session(experiment, self.settings(trainer, pl_module), trainer.global_step):
                self._sessions.add(folder)

    def to_dict(self) -> dict[str, Any]:
        return {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "monitor": self.monitor,
            "test_metric": self.test_metric,
            "latency": {"batch_size": self.batch_size, "num_threads": self.num_threads, "repeats": self.repeats},
            "stages": self.stages,
            "ratios": self.ratios(),
            **({"language_model": self.language_model} if self.language_model else {}),
        }

    @rank_zero_only
    def write(
        self, trainer: pl.Trainer | None = None, output_dir: str | Path | None = None, name: str = "report"
    ) -> dict[str, Path]:
        """Write ``<name>.json`` and ``<name>.md`` (and, with a trainer, the TensorBoard text and scalars).

        Paths among the figures (an artifact's file) are written relative to the output folder when they lie in it.

        Returns:
            The written files: ``{"json": ..., "markdown": ...}``.
        """
        if output_dir is not None:
            self.output_dir = Path(output_dir)
        elif trainer is not None:
            self.output_dir = Path(local_log_dir(trainer))
        assert self.output_dir is not None, "`write` needs a trainer or an output_dir"
        stages = _relative_paths(self.stages, self.output_dir)
        table = format_report_markdown(stages)
        if self.language_model:
            table += "\n\n## Language model\n\n" + format_language_model_markdown(self.language_model)
        files = {"json": self.output_dir / f"{name}.json", "markdown": self.output_dir / f"{name}.md"}
        with atomic_write(files["json"]) as fh:
            fh.write(json.dumps({**self.to_dict(), "stages": stages}, indent=2))
        with atomic_write(files["markdown"]) as fh:
            fh.write(f"# Compression report\n\n{table}\n")
        self.artifacts = {"report": str(files["markdown"])}
        if trainer is not None:
            step = trainer.global_step
            scalars = {
                f"report/{stage}/{key}": float(value)
                for stage, figures in self.stages.items()
                for key, value in figures.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            }
            scalars.update(
                {
                    f"report/lm/{stage}/{key}": float(value)
                    for stage, figures in self.language_model.items()
                    for key, value in figures.items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)
                }
            )
            headline = self.headline()
            scalars.update(headline)
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if experiment is not None and hasattr(experiment, "add_text"):
                    experiment.add_text("compression_report", table, global_step=step)
                extra = {}
                # Lightning's own logger logged `hp_metric = -1` at the start: make it the monitored metric
                if getattr(logger, "_default_hp_metric", False) and f"hp/{self.monitor}" in headline:
                    extra["hp_metric"] = headline[f"hp/{self.monitor}"]
                logger.log_metrics({**scalars, **extra}, step=step)
                logger.save()
        return files


# ------------------------------------------------------------------------------------------------ language models
_LM_LABELS = {
    "lm_ppl": "perplexity (validation batches)",
    "params": "parameters",
    "size_bytes": "saved weights (bytes)",
    "prefill_tokens_per_s": "prefill tokens/s",
    "decode_tokens_per_s": "decode tokens/s",
}


def language_model_figures(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    decode_tokens: int = 16,
    batch_size: int = 1,
    num_threads: int = 1,
    repeats: int = 3,
    compile: bool = False,
) -> dict[str, float]:
    """Perplexity, parameters, bytes and tokens per second (prefill and decode) of a next-token model.

    ``model`` maps ``(batch, tokens)`` int64 ids to ``(batch, tokens, vocab)`` logits: an ``nn.Module`` or an exported
    artifact (``lightning_opt.quantization.linear.load_artifact``). Measured in eval mode, on the CPU, with
    ``num_threads`` threads:

    - ``lm_ppl``: ``exp`` of the mean next-token cross-entropy over the targets of ``batches`` (-100 ignored);
    - ``params`` and ``size_bytes`` (``torch.save`` of the ``state_dict``), for a module;
    - ``prefill_tokens_per_s``: ``batch_size`` windows of the first batch's length in one forward pass (median of
      ``repeats``);
    - ``decode_tokens_per_s``: ``decode_tokens`` greedy tokens for each of ``batch_size`` rows, one forward pass per
      token over a sliding window of that same length (the model sees the last ``tokens`` ids; there is no key/value
      cache, so a decode step costs one window's forward pass, and a model exported for that window length runs it).

    Args:
        model: The model or artifact.
        batches: ``(input_ids, targets)`` pairs, e.g. the first validation batches.
        decode_tokens: Tokens generated per timed decode.
        batch_size: Rows of the timed prefill and decode (the first batch's first row, tiled).
        num_threads: Torch threads while measuring.
        repeats: Timed runs of each speed figure.
        compile: Time ``torch.compile(model)`` (inductor, weights frozen: the deployed form of an int8 artifact);
            perplexity is computed on the model itself.

    Raises:
        ValueError: If ``batches`` is empty or ``decode_tokens``, ``batch_size`` or ``repeats`` is < 1.

    Examples:
        >>> from lightning_opt.lm import LanguageModel
        >>> model = LanguageModel(vocab_size=256, context=8, layers=1, width=8, heads=2, sample_tokens=0)
        >>> ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
        >>> figures = language_model_figures(model, [(ids, ids)], decode_tokens=2, repeats=1)
        >>> sorted(figures), 200 < figures["lm_ppl"] < 320
        (['decode_tokens_per_s', 'lm_ppl', 'params', 'prefill_tokens_per_s', 'size_bytes'], True)
    """
    if not batches:
        raise ValueError("`batches` must hold at least one (input_ids, targets) pair, got none.")
    for name, value in (("decode_tokens", decode_tokens), ("batch_size", batch_size), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}.")
    module = model if isinstance(model, torch.nn.Module) else None
    training = module.training if module is not None else False
    _set_training(module, False)
    try:
        with torch.no_grad():
            nats, count = 0.0, 0
            for ids, targets in batches:
                logits = model(ids.cpu()).float()
                flat = targets.cpu().reshape(-1)
                nats += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), flat, ignore_index=-100, reduction="sum"
                    )
                )
                count += int((flat != -100).sum())
            window = inputs.repeat_to(batches[0][0][:1].cpu(), batch_size)
            length = int(window.shape[1])
            run: Callable[[torch.Tensor], torch.Tensor] = model
            if compile:
                import torch._inductor.config as inductor_config

                compiled = torch.compile(model, dynamic=False)

                def run(x: torch.Tensor) -> torch.Tensor:
                    with inductor_config.patch(freezing=True):
                        return compiled(x)

            def decode(x: torch.Tensor) -> torch.Tensor:
                for _ in range(decode_tokens):
                    token = run(x)[:, -1].argmax(-1, keepdim=True)
                    x = torch.cat([x[:, 1:], token], dim=1)
                return x

            prefill = measure_latency(run, window, warmup=2, repeats=repeats, num_threads=num_threads)
            decoding = measure_latency(decode, window, warmup=1, repeats=repeats, num_threads=num_threads)
    finally:
        _set_training(module, training)
    figures: dict[str, float] = {"lm_ppl": math.exp(nats / max(count, 1))}
    if module is not None:
        figures["params"] = count_parameters(module)
        figures["size_bytes"] = saved_size_bytes(module)
    figures["prefill_tokens_per_s"] = batch_size * length / (prefill.median_ms / 1000)
    figures["decode_tokens_per_s"] = batch_size * decode_tokens / (decoding.median_ms / 1000)
    return figures


def _set_training(module: torch.nn.Module | None, mode: bool) -> None:
    """``module.train(mode)``; an exported program's module refuses it and has its mode fixed already."""
    if module is None:
        return
    with contextlib.suppress(NotImplementedError, RuntimeError):
        module.train(mode)


def format_language_model_markdown(stages: dict[str, dict[str, Any]], baseline: str = "baseline") -> str:
    """The language-model section: one row per figure, one column per stage, then each stage against the baseline.

    The ratio columns are ``stage / baseline`` for tokens per second (2.00x: twice as fast) and ``baseline / stage``
    for parameters and bytes (2.00x: half the size), as in the main table; perplexity gets its relative change.

    Examples:
        >>> print(format_language_model_markdown({"baseline": {"lm_ppl": 4.0}, "int8": {"lm_ppl": 4.02}}))
        | figure | baseline | int8 | int8 vs baseline |
        |---|---|---|---|
        | perplexity (validation batches) | 4 | 4.02 | +0.50% |
    """
    names = list(stages)
    others = [n for n in names if n != baseline] if baseline in stages else []
    keys = [k for k in _LM_LABELS if any(k in figures for figures in stages.values())]
    header = ["figure", *names, *(f"{n} vs {baseline}" for n in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        row = [_LM_LABELS[key], *(_fmt(stages[n].get(key)) for n in names)]
        for n in others:
            a, b = stages[baseline].get(key), stages[n].get(key)
            if not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and a and b):
                row.append("")
            elif key == "lm_ppl":
                row.append(f"{(b - a) / a:+.2%}")
            elif key.endswith("_per_s"):
                row.append(f"{b / a:.2f}x")
            else:
                row.append(f"{a / b:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _flatten_hparams(prefix: str, value: Mapping[str, Any], out: dict[str, Any], depth: int) -> None:
    """``{"optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.1, "eps": 1e-08}}}`` ->
    ``optimizer: Adam``, ``optimizer/lr: 0.1`` (a class's arguments that differ from its defaults); private keys
    (``_instantiator``) left out; below two levels a dict is one JSON value.
    """
    for key, item in value.items():
        if str(key).startswith("_"):
            continue
        name = f"{prefix}/{key}"
        if isinstance(item, Mapping) and depth < 2:
            if "class_path" in item:
                out[name] = str(item["class_path"]).rsplit(".", 1)[-1]
                item = _non_default(str(item["class_path"]), item.get("init_args") or {})
            _flatten_hparams(name, item, out, depth + 1)
        else:
            out[name] = item


def _non_default(class_path: str, init_args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments in ``init_args`` that differ from the defaults of ``class_path`` (all when it cannot be read)."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return dict(init_args)

    def is_default(key: str, value: Any) -> bool:
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        if isinstance(value, list) and isinstance(default, tuple):  # YAML has no tuples
            value = tuple(value)
        try:
            return default is not inspect.Parameter.empty and bool(default == value)
        except Exception:  # a default that does not compare to a plain value (a tensor)
            return False

    return {k: v for k, v in init_args.items() if not is_default(k, v)}
