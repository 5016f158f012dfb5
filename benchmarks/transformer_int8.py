"""Which int8 route makes a small ViT and a small GPT-style decoder faster on this CPU? Side by side, one process.

Models (random init, built from configs; nothing downloaded):

- ViT: timm ``VisionTransformer``, 96x96 images, patch 8 (145 tokens), embed 192, depth 6, 4 heads of 48, MLP 768,
  10 classes (the size class of ViT-Tiny, half its depth, at a small image size).
- GPT: transformers ``GPT2LMHeadModel``, vocab 16384, 64 positions used, embed 256, 6 layers, 4 heads of 64, tied
  ``lm_head``; inputs are 64 random token ids (``int64``); the output is the logits.
- ``-heads50``: the same architecture with 2 heads of the same head size (q/k/v/out projections cut to half the
  attention width, embed and MLP unchanged). It stands in for a 50%-head-pruned model until the pruning helper's
  head removal lands; its weights are random, which does not change the timing.

GPT-2's ``Conv1D`` layers are replaced by equal ``nn.Linear`` (:func:`lightning_opt.quantization._linear.
linearize_conv1d`) in every route, fp32 included, since torchao and the x86 quantizer only see ``nn.Linear``.

Routes (each timed on the same input, interleaved, same thread count):

- ``fp32``: eager fp32 (the reference of every ratio).
- ``fp32_compiled``: ``torch.compile`` with inductor freezing (as the project deploys).
- ``ao_dyn``: torchao ``quantize_`` int8 dynamic activation + int8 weight (the ``int8_dynamic`` scheme), eager.
- ``ao_dyn_compiled``: the same under ``torch.compile`` with freezing.
- ``ao_wo_compiled``: torchao int8 weight-only (the ``int8_weight_only`` scheme) under ``torch.compile``.
- ``pt2e_dyn``: ``torch.export`` -> ``X86InductorQuantizer(is_dynamic=True)`` -> ``convert_pt2e`` -> compile with
  freezing (oneDNN int8 linear, activations quantized at run time).
- ``pt2e_static``: the same with static activation ranges calibrated on 4 batches (the ``pt2e_static`` scheme).

Inductor bakes the thread count into its kernels, so each thread count compiles its own runners.

Usage (about 4 minutes per model and thread count on the shared 2-core machine):
    OMP_NUM_THREADS=1 python benchmarks/transformer_int8.py --model vit --threads 1
    python benchmarks/transformer_int8.py --model gpt --threads 2 --batch 1 8 --routes fp32 pt2e_static
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_opt.measure import count_parameters, measure_latency
from lightning_opt.quantization import _linear

ROUTES = ("fp32", "fp32_compiled", "ao_dyn", "ao_dyn_compiled", "ao_wo_compiled", "pt2e_dyn", "pt2e_static")
VIT = {"img_size": 96, "patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 4, "num_classes": 10}
GPT = {"vocab_size": 16384, "n_positions": 64, "n_embd": 256, "n_layer": 6, "n_head": 4}
SEQ = 64


class _Logits(nn.Module):
    """A Hugging Face LM returning its logits tensor (what a deployment returns), without a KV cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def build_vit(half_heads: bool) -> nn.Module:
    import timm
    from timm.layers import Attention

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT)
    if half_heads:
        head_dim = VIT["embed_dim"] // VIT["num_heads"]
        for block in model.blocks:
            block.attn = Attention(
                VIT["embed_dim"], num_heads=VIT["num_heads"] // 2, attn_head_dim=head_dim, qkv_bias=True
            )
    return model.eval()


def build_gpt(half_heads: bool) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    config = GPT2Config(**GPT, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    if half_heads:
        head_dim = GPT["n_embd"] // GPT["n_head"]
        inner = head_dim * (GPT["n_head"] // 2)
        for block in model.transformer.h:
            attn = block.attn
            attn.c_attn = Conv1D(3 * inner, GPT["n_embd"])
            attn.c_proj = Conv1D(GPT["n_embd"], inner)
            attn.num_heads, attn.split_size, attn.embed_dim = GPT["n_head"] // 2, inner, inner
            nn.init.normal_(attn.c_attn.weight, std=0.02)
            nn.init.normal_(attn.c_proj.weight, std=0.02)
    _linear.linearize_conv1d(model)
    return _Logits(model).eval()


def example(kind: str, batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return torch.randn(batch, 3, VIT["img_size"], VIT["img_size"], generator=gen)
    return torch.randint(0, GPT["vocab_size"], (batch, SEQ), generator=gen)


class Compiled:
    """``torch.compile`` with inductor freezing (needed for the int8 patterns and weight prepacking)."""

    def __init__(self, model: nn.Module) -> None:
        self.compiled = torch.compile(model, dynamic=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(x)


def pt2e(model: nn.Module, x: torch.Tensor, static: bool, calibration: list[torch.Tensor]) -> nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    graph = torch.export.export(copy.deepcopy(model).eval(), (x,), strict=False).module()
    config = get_default_x86_inductor_quantization_config(is_dynamic=not static)
    prepared = prepare_pt2e(graph, X86InductorQuantizer().set_global(config))
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return convert_pt2e(prepared)


def build_route(route: str, model: nn.Module, kind: str, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    x = example(kind, batch)
    calibration = [example(kind, batch, seed=s) for s in range(1, 5)]
    if route == "fp32":
        return model
    if route == "fp32_compiled":
        return Compiled(model)
    if route in ("ao_dyn", "ao_dyn_compiled", "ao_wo_compiled"):
        clone = copy.deepcopy(model)
        _linear.quantize(clone, "int8_weight_only" if route == "ao_wo_compiled" else "int8_dynamic")
        return Compiled(clone) if route.endswith("compiled") else clone
    if route in ("pt2e_dyn", "pt2e_static"):
        return Compiled(pt2e(model, x, static=route == "pt2e_static", calibration=calibration))
    raise ValueError(f"`route` must be one of {list(ROUTES)}, got {route!r}.")


def run(
    kind: str, threads: int, batches: list[int], routes: list[str], variants: list[str], rounds: int, repeats: int
) -> None:
    torch.set_num_threads(threads)
    for variant in variants:
        model = build_vit(variant == "heads50") if kind == "vit" else build_gpt(variant == "heads50")
        name = f"{kind}-{variant}"
        print(f"\n## {name}: {count_parameters(model) / 1e6:.2f}M params, {threads} thread(s)", flush=True)
        for batch in batches:
            torch._dynamo.reset()
            x = example(kind, batch)
            with torch.inference_mode():
                reference = model(x)
            runners: dict[str, Any] = {}
            errors: dict[str, float] = {}
            for route in routes:
                start = time.perf_counter()
                try:
                    runner = build_route(route, model, kind, batch)
                    with torch.inference_mode():  # the mode measure_latency times in: no recompilation there
                        out = runner(x)  # compiles here
                except Exception as err:  # a route that fails is reported, not fatal
                    print(f"  {route}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                    continue
                runners[route] = runner
                errors[route] = float((out - reference).abs().max() / reference.abs().max())
                print(f"  built {route} in {time.perf_counter() - start:.1f}s", flush=True)
            medians: dict[str, list[float]] = {r: [] for r in runners}
            for _ in range(rounds):  # interleaved: machine noise hits every route alike
                for route, runner in runners.items():
                    medians[route].append(
                        measure_latency(runner, x, warmup=1, repeats=repeats, num_threads=threads).median_ms
                    )
            ms = {r: statistics.median(v) for r, v in medians.items()}
            base = ms.get("fp32")
            print(f"  batch {batch}: route, ms, x fp32 eager, x fp32 compiled, max |err| / max |fp32|")
            for route, value in ms.items():
                vs_eager = f"{base / value:5.2f}x" if base else "  -  "
                vs_comp = f"{ms['fp32_compiled'] / value:5.2f}x" if "fp32_compiled" in ms else "  -  "
                print(
                    f"    {name:12s} b{batch} {route:16s} {value:8.2f} ms  {vs_eager}  {vs_comp}  {errors[route]:.4f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("vit", "gpt"), required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES)
    parser.add_argument("--variants", nargs="+", default=["full", "heads50"], choices=("full", "heads50"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    run(args.model, args.threads, args.batch, args.routes, args.variants, args.rounds, args.repeats)


if __name__ == "__main__":
    main()
