"""Int8 quantization benchmark: latency (int8 vs fp32 eager vs fp32 compiled) and accuracy (fp32 / PTQ / QAT).

Part 1, latency, measured side by side in one process, interleaved (rounds of eager, compiled, int8, ONNX), the median
of the per-round medians, with a stated thread count:

- torchvision resnet18 (no weights), batch 8, 3x224x224;
- the digits CNN (SmallCNN, channels [32, 64], 1x8x8), batch 1 and 64.

int8 is our path end to end: PTQ (``prepare_pt2e`` + 10 calibration batches) -> ``convert_pt2e`` -> ``.pt2`` saved and
loaded back -> ``torch.compile`` with inductor freezing (oneDNN int8 kernels). fp32 compiled is ``torch.compile`` with
the same freezing. The ONNX Runtime column is fp32 ``torch.onnx.export(dynamo=True)`` + ``quantize_static`` (QDQ,
per channel), timed in onnxruntime with the same thread count.

Part 2, accuracy on MNIST-5k (3,500 / 500 / 1,000, Adam lr 1e-3, batch 64, ``--epochs`` epochs, seeds ``--seeds``):
a compact SmallCNN (channels [16, 32, 64], global-average-pool head, ~24k parameters) trained in fp32, then

- fp32: the trained model's test accuracy;
- PTQ int8: the same model, 10 calibration batches (:class:`PostTrainingQuantization`);
- QAT int8: the trained fp32 model fine-tuned ``--qat_epochs`` epochs (Adam lr 1e-4) with fake quantization from the
  first step (:class:`QuantizationAwareTraining`; observers and BatchNorm statistics keep updating: in a 3-epoch
  fine-tune, freezing them at 60% / 70% cost about a point on seed 2);
- fp32 fine-tuned: the control, the same fine-tuning without quantization (QAT gets no credit for extra steps),
  and PTQ int8 of that control (the PTQ baseline QAT must beat at equal training).

Both int8 figures come from the saved ``.pt2`` artifacts, compiled, on the 1,000 test digits.

Usage:
    python benchmarks/quantization.py                    # both parts (about 15-25 minutes on 2 shared cores)
    python benchmarks/quantization.py --part latency --threads 1
    python benchmarks/quantization.py --part size        # bytes on disk of fp32 and int8 artifacts
    python benchmarks/quantization.py --part accuracy --seeds 0 --epochs 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lightning_opt, not an installed one

from lightning_opt.measure import measure_latency
from lightning_opt.quantization import (
    CompiledInference,
    OnnxRuntimeModel,
    QuantSpec,
    calibrate,
    convert,
    export_onnx,
    load_artifact,
    quantize_onnx,
    save_artifact,
)


def _compiled_fp32(model: nn.Module) -> CompiledInference:
    return CompiledInference(model)  # same inductor + freezing path as int8, fp32 weights


def _int8(model: nn.Module, example: torch.Tensor, tmp: Path, name: str) -> nn.Module:
    batches = [torch.randn(*example.shape) for _ in range(10)]
    spec = QuantSpec(module="", input_shape=[1, *example.shape[1:]], mode="ptq")
    graph = calibrate(model, spec, batches, 10)
    save_artifact(convert(graph), example, tmp / f"{name}.pt2")
    return CompiledInference(load_artifact(tmp / f"{name}.pt2"))


def _onnx_int8(model: nn.Module, example: torch.Tensor, tmp: Path, name: str, threads: int) -> nn.Module:
    fp32 = tmp / f"{name}.onnx"
    int8 = tmp / f"{name}.int8.onnx"
    export_onnx(model, example[:1], fp32)
    quantize_onnx(fp32, int8, [(torch.randn(*example.shape),) for _ in range(10)], num_batches=10)
    return OnnxRuntimeModel(int8, num_threads=threads)


def latency_rows(name: str, model: nn.Module, example: torch.Tensor, threads: int, rounds: int, repeats: int,
                 tmp: Path, onnx: bool = True) -> dict[str, float]:  # fmt: skip
    model.eval()
    runners: dict[str, nn.Module] = {"fp32 eager": model}
    t0 = time.perf_counter()
    runners["fp32 compiled"] = _compiled_fp32(model)
    runners["fp32 compiled"](example)
    t1 = time.perf_counter()
    runners["int8 pt2e compiled"] = _int8(model, example, tmp, name)
    runners["int8 pt2e compiled"](example)
    t2 = time.perf_counter()
    if onnx:
        runners["int8 onnxruntime"] = _onnx_int8(model, example, tmp, name, threads)
    print(f"  [{name}] compile fp32 {t1 - t0:.0f}s, quantize+convert+compile int8 {t2 - t1:.0f}s")
    medians: dict[str, list[float]] = {k: [] for k in runners}
    with torch.no_grad():
        for _ in range(rounds):
            for key, runner in runners.items():
                result = measure_latency(runner, example, warmup=3, repeats=repeats, num_threads=threads)
                medians[key].append(result.median_ms)
    out = {k: statistics.median(v) for k, v in medians.items()}
    base, comp = out["fp32 eager"], out["fp32 compiled"]
    print(f"\n{name}, batch {example.shape[0]}, {threads} thread(s), median of {rounds} interleaved rounds:")
    print(f"  {'':22s} {'ms':>9s} {'vs eager':>9s} {'vs compiled':>12s}")
    for key, ms in out.items():
        print(f"  {key:22s} {ms:9.3f} {base / ms:8.2f}x {comp / ms:11.2f}x")
    return out


def part_latency(threads: int, rounds: int) -> dict[str, dict[str, float]]:
    import torchvision

    from lightning_opt.models import SmallCNN

    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        resnet = torchvision.models.resnet18(weights=None)
        results["resnet18_b8"] = latency_rows("resnet18", resnet, torch.randn(8, 3, 224, 224), threads, rounds, 10, tmp)
        cnn = SmallCNN(in_channels=1, num_classes=10, channels=(32, 64))
        results["digits_cnn_b1"] = latency_rows("digits-cnn", cnn, torch.randn(1, 1, 8, 8), threads, rounds, 200, tmp)
        results["digits_cnn_b64"] = latency_rows(
            "digits-cnn-b64", cnn, torch.randn(64, 1, 8, 8), threads, rounds, 50, tmp
        )
    return results


def part_size() -> dict[str, dict[str, int]]:
    """Bytes on disk of each artifact: fp32 and int8 ``.pt2`` (torch.export), fp32 and int8 ONNX (QDQ)."""
    import os

    import torchvision

    from lightning_opt.models import SmallCNN

    torch.manual_seed(0)
    models = {
        "resnet18, 3x224x224": (torchvision.models.resnet18(weights=None), (1, 3, 224, 224)),
        "mobilenet_v2, 3x224x224": (torchvision.models.mobilenet_v2(weights=None), (1, 3, 224, 224)),
        "SmallCNN [16, 32, 64], 1x28x28 (MNIST-5k)": (
            SmallCNN(in_channels=1, num_classes=10, channels=(16, 32, 64)),
            (1, 1, 28, 28),
        ),
        "digits CNN [32, 64], 1x8x8": (SmallCNN(in_channels=1, num_classes=10, channels=(32, 64)), (1, 1, 8, 8)),
    }
    results: dict[str, dict[str, int]] = {}
    print("\n| model | params | fp32 .pt2 | int8 .pt2 | fp32 / int8 | fp32 ONNX | int8 ONNX | fp32 / int8 |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for i, (name, (model, shape)) in enumerate(models.items()):
            model.eval()
            example = torch.randn(*shape)
            sizes = {"params": sum(p.numel() for p in model.parameters())}
            sizes["fp32_pt2"] = save_artifact(model, example, tmp / f"m{i}_fp32.pt2")
            spec = QuantSpec(module="", input_shape=list(shape), mode="ptq")
            graph = calibrate(model, spec, [torch.randn(*shape) for _ in range(4)], 4)
            sizes["int8_pt2"] = save_artifact(convert(graph), example, tmp / f"m{i}_int8.pt2")
            export_onnx(model, example, tmp / f"m{i}.onnx")
            quantize_onnx(tmp / f"m{i}.onnx", tmp / f"m{i}.int8.onnx", [(torch.randn(*shape),) for _ in range(4)], 4)
            sizes["fp32_onnx"] = os.path.getsize(tmp / f"m{i}.onnx")
            sizes["int8_onnx"] = os.path.getsize(tmp / f"m{i}.int8.onnx")
            results[name] = sizes

            def kb(n: int) -> str:
                return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"

            print(
                f"| {name} | {sizes['params'] / 1e6:.3f}M | {kb(sizes['fp32_pt2'])} | {kb(sizes['int8_pt2'])} "
                f"| {sizes['fp32_pt2'] / sizes['int8_pt2']:.2f}x | {kb(sizes['fp32_onnx'])} | {kb(sizes['int8_onnx'])} "
                f"| {sizes['fp32_onnx'] / sizes['int8_onnx']:.2f}x |",
                flush=True,
            )
    return results


def _trainer(tmp: Path, callbacks: list, epochs: int):
    import lightning.pytorch as pl

    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        accelerator="cpu",
        devices=1,
    )


def part_accuracy(seeds: list[int], epochs: int, threads: int, qat_epochs: int = 3) -> dict[str, list[float]]:
    import lightning.pytorch as pl

    from lightning_opt.data import MNIST5kDataModule
    from lightning_opt.module import ImageClassifier
    from lightning_opt.quantization import PostTrainingQuantization, QuantizationAwareTraining

    def model(lr: float) -> ImageClassifier:
        return ImageClassifier(
            "small_cnn",
            input_size=28,
            backbone_kwargs={"channels": [16, 32, 64]},
            optimizer=lambda params: torch.optim.Adam(params, lr=lr),
        )

    torch.set_num_threads(threads)
    rows: dict[str, list[float]] = {
        "fp32": [],
        "ptq_int8": [],
        "fp32_finetuned": [],
        "ptq_int8_finetuned": [],
        "qat_int8": [],
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for seed in seeds:
            data = MNIST5kDataModule(batch_size=64, seed=0)
            pl.seed_everything(seed, verbose=False)
            fp32 = model(1e-3)
            ptq = PostTrainingQuantization(calibration_batches=10, artifact_path=str(tmp / f"ptq{seed}.pt2"),
                                           latency=False)  # fmt: skip
            trainer = _trainer(tmp, [ptq], epochs)
            trainer.fit(fp32, data)
            rows["fp32"].append(trainer.test(fp32, data, verbose=False)[0]["test/acc"])
            rows["ptq_int8"].append(ptq.results["test/acc"])
            trained = {k: v.clone() for k, v in fp32.state_dict().items()}

            # control: the same fine-tuning in fp32, so QAT's figure is not credited with the extra steps
            pl.seed_everything(seed, verbose=False)
            control = model(1e-4)
            control.load_state_dict(trained)
            ptq_ft = PostTrainingQuantization(calibration_batches=10, artifact_path=str(tmp / f"ptqft{seed}.pt2"),
                                              latency=False)  # fmt: skip
            trainer = _trainer(tmp, [ptq_ft], qat_epochs)
            trainer.fit(control, data)
            rows["fp32_finetuned"].append(trainer.test(control, data, verbose=False)[0]["test/acc"])
            rows["ptq_int8_finetuned"].append(ptq_ft.results["test/acc"])

            pl.seed_everything(seed, verbose=False)
            qat_model = model(1e-4)
            qat_model.load_state_dict(trained)
            qat = QuantizationAwareTraining(start=0,
                                            artifact_path=str(tmp / f"qat{seed}.pt2"), latency=False)  # fmt: skip
            trainer = _trainer(tmp, [qat], qat_epochs)
            trainer.fit(qat_model, data)
            rows["qat_int8"].append(qat.results["test/acc"])
            print(f"  seed {seed}: " + ", ".join(f"{k} {v[-1] * 100:.2f}" for k, v in rows.items()), flush=True)
    print(f"\nMNIST-5k test accuracy (%), SmallCNN [16, 32, 64], {epochs} fp32 epochs + {qat_epochs} fine-tuning "
          f"epochs (lr 1e-4), seeds {seeds}:")  # fmt: skip
    for key, values in rows.items():
        mean = statistics.mean(values) * 100
        spread = (statistics.stdev(values) * 100) if len(values) > 1 else 0.0
        print(f"  {key:16s} {mean:6.2f} +- {spread:.2f}   {[round(v * 100, 2) for v in values]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "latency", "size", "accuracy"], default="all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--qat_epochs", type=int, default=3, help="fine-tuning epochs of QAT (and its fp32 control)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    out: dict[str, object] = {"threads": args.threads}
    if args.part in ("all", "latency"):
        out["latency"] = part_latency(args.threads, args.rounds)
    if args.part in ("all", "size"):
        out["size"] = part_size()
    if args.part in ("all", "accuracy"):
        out["accuracy"] = part_accuracy(
            [int(s) for s in args.seeds.split(",")], args.epochs, args.threads, args.qat_epochs
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
