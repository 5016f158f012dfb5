"""Causal language models: a small GPT-style decoder and the ``LanguageModel`` LightningModule that trains it.

`GPTDecoder` is built from plain ``nn.Embedding``, ``nn.LayerNorm`` and ``nn.Linear`` layers (one fused ``qkv``
and one ``proj`` per attention, ``fc1``/``fc2`` per MLP) and ``F.scaled_dot_product_attention(is_causal=True)``, so
the project's pruning and quantization callbacks see ordinary Linear layers; every attention module exposes
``num_heads`` and takes its head size from its weights, so heads removed physically keep it working.

`LanguageModel` trains it (or a Hugging Face causal LM built from a config, never downloaded) on next-token
cross-entropy and reports the loss, perplexity and bits per byte, with a generated sample in TensorBoard at each
validation. It reads its tokenizer and the bytes each token stands for from a
`TextDataModule`, and checks before training that the datamodule's vocabulary and context
fit the model.

Examples:
    >>> model = LanguageModel(vocab_size=256, context=16, layers=1, width=16, heads=2)
    >>> model(model.example_input_array).shape
    torch.Size([1, 16, 256])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_opt.schedules import check_point, resolve_step
from lightning_opt.targets import IGNORE_INDEX
from lightning_opt.text import ByteTokenizer, Tokenizer, tokenizer_from_state, tokenizer_state

__all__ = [
    "IGNORE_INDEX",
    "TOKENIZER_KEY",
    "CausalSelfAttention",
    "GPTDecoder",
    "LanguageModel",
    "LanguageModelingMetric",
    "next_token_losses",
]

#: Checkpoint key of the model's tokenizer (`tokenizer_state`).
TOKENIZER_KEY = "lightning_opt_tokenizer"

#: Target id that counts in no loss or metric (padding), as in ``F.cross_entropy``.


def _positive_int(name: str, value: Any, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.{' HINT: ' + hint if hint else ''}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused ``qkv`` Linear and an output ``proj`` Linear.

    Laid out as timm's ``Attention`` (``num_heads``, ``head_dim``, ``attn_dim = num_heads * head_dim``; ``qkv``'s
    outputs are ``[q heads, k heads, v heads]``, reshaped to ``(batch, tokens, 3, heads, head_dim)``), which the
    attention-aware channel pruning recognises: ``Pruning(granularity="channel", remove_channels=True)`` removes
    whole heads (it updates ``num_heads`` and ``attn_dim``; the head size is read from ``qkv``'s weight) and MLP units.

    Args:
        width: Model width.
        heads: Number of heads; must divide ``width``.
        dropout: Dropout on the attention weights and the output.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = width // heads
        self.attn_dim = width
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, -1)))


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class _Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = _MLP(width, hidden, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPTDecoder(nn.Module):
    """A small pre-LN GPT-style decoder: token and learned position embeddings, blocks, a final LayerNorm, a head.

    Args:
        vocab_size: Number of token ids.
        context: Longest input, in tokens (the number of learned positions).
        layers: Number of transformer blocks.
        width: Model width (embedding size).
        heads: Attention heads per block; must divide ``width``.
        mlp_ratio: Hidden units of each MLP, as a multiple of ``width``.
        dropout: Dropout on embeddings, attention and MLP outputs (0 for none).
        tie_weights: Share the head's weight with the token embedding.

    Raises:
        ValueError: If a size is not a positive integer, ``heads`` does not divide ``width``, ``mlp_ratio`` <= 0 or
            ``dropout`` is outside [0, 1).

    Examples:
        >>> decoder = GPTDecoder(vocab_size=256, context=8, layers=2, width=16, heads=4)
        >>> decoder(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 256])
        >>> decoder.blocks[0].attn.num_heads, type(decoder.blocks[0].attn.qkv).__name__
        (4, 'Linear')
    """

    def __init__(
        self,
        vocab_size: int = 256,
        context: int = 256,
        layers: int = 4,
        width: int = 256,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("context", context), ("layers", layers), ("width", width)):
            _positive_int(name, value)
        _positive_int("heads", heads)
        if width % heads:
            raise ValueError(
                f"`heads` must divide `width`, got heads={heads} and width={width}. HINT: the head size is "
                f"width / heads; try heads={math.gcd(width, heads)}."
            )
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"`mlp_ratio` must be a number > 0, got {mlp_ratio!r}.")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
        self.vocab_size = vocab_size
        self.context = context
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(context, width)
        self.dropout = nn.Dropout(dropout)
        hidden = max(1, round(width * mlp_ratio))
        self.blocks = nn.ModuleList(_Block(width, heads, hidden, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2: residual projections scaled down with depth
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * layers))
        if tie_weights:
            self.head.weight = self.token_embedding.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``(batch, tokens, vocab_size)`` of ``(batch, tokens)`` ids, each position seeing only the past."""
        t = input_ids.shape[-1]
        if t > self.position_embedding.num_embeddings:
            raise ValueError(
                f"The input has {t} tokens, more than the model's context of "
                f"{self.position_embedding.num_embeddings}. HINT: crop it to the last `context` tokens."
            )
        positions = torch.arange(t, device=input_ids.device)
        x = self.dropout(self.token_embedding(input_ids) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def next_token_losses(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Cross-entropy of every target token (nats) and the mask of the tokens that count (``targets != ignore_index``).

    Args:
        logits: ``(..., vocab)`` scores.
        targets: ``(...)`` ids, ``ignore_index`` for tokens that count in nothing (padding).
        ignore_index: The id that is ignored.

    Returns:
        ``(losses, mask)``, both flat; ``losses`` is 0 where ``mask`` is false.

    Examples:
        >>> logits = torch.zeros(1, 3, 4)
        >>> losses, mask = next_token_losses(logits, torch.tensor([[1, -100, 2]]))
        >>> [round(v, 4) for v in losses.tolist()], mask.tolist()
        ([1.3863, 0.0, 1.3863], [True, False, True])
    """
    flat_targets = targets.reshape(-1)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat_targets, ignore_index=ignore_index, reduction="none"
    )
    return losses, flat_targets != ignore_index


class LanguageModelingMetric(Metric):
    """Loss, perplexity and bits per byte of next-token predictions, summed over tokens and synced across processes.

    ``loss`` is the mean cross-entropy per target token (nats), ``ppl`` = ``exp(loss)`` and ``bpb`` = the summed
    cross-entropy in bits over the UTF-8 bytes of the target tokens' text (for a byte tokenizer, ``loss / ln 2``).

    Examples:
        >>> metric = LanguageModelingMetric()
        >>> metric.update(torch.tensor([math.log(4.0)] * 2), torch.tensor([2, 2]))
        >>> {k: round(float(v), 4) for k, v in metric.compute().items()}
        {'loss': 1.3863, 'ppl': 4.0, 'bpb': 1.0}
    """

    full_state_update = False
    nats: Tensor
    tokens: Tensor
    bytes: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("bytes", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, losses: Tensor, token_bytes: Tensor) -> None:
        """Add the losses (nats) of counted tokens and the bytes each of them stands for."""
        # out of place: states reset under inference mode (trainer.validate) cannot be updated in place afterwards
        self.nats = self.nats + losses.detach().double().sum()
        self.tokens = self.tokens + losses.numel()
        self.bytes = self.bytes + token_bytes.long().sum()

    def compute(self) -> dict[str, Tensor]:
        """``{"loss", "ppl", "bpb"}``."""
        loss = self.nats / self.tokens.clamp(min=1)
        bpb = self.nats / (math.log(2) * self.bytes.clamp(min=1))
        return {"loss": loss.float(), "ppl": loss.exp().float(), "bpb": bpb.float()}


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def _build_hf(hf_config: dict[str, Any], vocab_size: int, context: int) -> nn.Module:
    """A Hugging Face causal LM at random init from ``AutoConfig.for_model(**hf_config)``, nothing downloaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(hf_config)
    model_type = config.pop("model_type", None)
    if not model_type:
        raise ValueError(
            f"`hf_config` must name its `model_type` (e.g. gpt2, llama), got keys {sorted(hf_config)}. HINT: "
            "hf_config: {model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2}."
        )
    for key, value, mine in [("vocab_size", config.get("vocab_size"), vocab_size)] + [
        (k, config.get(k), context) for k in _CONTEXT_KEYS
    ]:
        if value is not None and value != mine:
            owner = "vocab_size" if key == "vocab_size" else "context"
            raise ValueError(
                f"`hf_config.{key}`={value} disagrees with the LanguageModel's `{owner}`={mine}. HINT: leave "
                f"{key} out of hf_config; the LanguageModel's `{owner}` sets it."
            )
    config["vocab_size"] = vocab_size
    config.setdefault("max_position_embeddings", context)  # GPT-2 maps it to n_positions
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # GPT-2's defaults (50256) lie outside a small vocab
        config.setdefault(key, None)
    try:
        hf = AutoConfig.for_model(model_type, **config)
    except ValueError as err:
        raise ValueError(
            f"`hf_config.model_type`={model_type!r} is not a Hugging Face model type known to this transformers "
            "release. HINT: causal LMs such as gpt2, llama, gpt_neox, opt, qwen2."
        ) from err
    return AutoModelForCausalLM.from_config(hf)


class LanguageModel(pl.LightningModule):
    """Trains a causal language model on next-token cross-entropy; reports loss, perplexity and bits per byte.

    The backbone is a `GPTDecoder` (``layers``, ``width``, ``heads``, ``mlp_ratio``, ``dropout``,
    ``tie_weights``) or, with ``hf_config``, a Hugging Face causal LM built from a config at random init (its
    ``vocab_size`` and context are this module's). Batches are ``(input_ids, targets)``, both ``(batch, tokens)``
    int64; targets equal to -100 count in nothing.

    Logs ``train/loss`` (each step and epoch), ``val/loss``, ``val/ppl``, ``val/bpb`` and the same under ``test/``.
    Bits per byte use the UTF-8 bytes each target token stands for, read from the datamodule's tokenizer (a
    `TextDataModule`; bytes otherwise). After each validation (not the sanity check) a
    sample continuing ``sample_prompt`` goes to TensorBoard as text (``val/sample``) when the logger is TensorBoard.

    The optimizer is AdamW (weight decay on matrices only) with a linear warmup over ``warmup`` steps and a cosine
    decay to ``min_lr_ratio * lr`` at the last step (``trainer.estimated_stepping_batches``), stepped every step.

    Args:
        vocab_size: Number of token ids; at least the tokenizer's (256 for bytes).
        context: Longest input in tokens; at least the datamodule's ``context``.
        layers: Decoder blocks.
        width: Decoder width.
        heads: Attention heads per block.
        mlp_ratio: MLP hidden units per unit of width.
        dropout: Dropout of the decoder.
        tie_weights: Share the decoder's head with its token embedding.
        hf_config: Keyword arguments of ``transformers.AutoConfig.for_model`` with its ``model_type``
            (``{model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2}``); replaces the decoder arguments above.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay of the weight matrices (not biases, norms' weights).
        betas: AdamW betas.
        warmup: Warmup length: optimizer steps (int) or a fraction of the run's steps (float in [0, 1]).
        min_lr_ratio: Learning rate at the end of the cosine, as a fraction of ``lr``.
        sample_prompt: Text the logged sample continues.
        sample_tokens: Tokens generated for the sample (0: no sample).
        sample_top_k: Sample from the ``k`` most likely tokens (seeded by ``sample_seed``); ``None``: greedy.
        sample_seed: Seed of the sample's generator.

    Raises:
        ValueError: Here, if a size, rate or sample setting is out of range or ``hf_config`` disagrees with
            ``vocab_size``/``context``; at ``setup`` (before training), if the datamodule's tokenizer has more tokens
            than ``vocab_size`` or its ``context`` is longer than the model's.

    Examples:
        >>> model = LanguageModel(vocab_size=256, context=8, layers=1, width=8, heads=2, sample_tokens=4)
        >>> len(model.generate("ab", max_new_tokens=4))
        6
    """

    def __init__(
        self,
        vocab_size: int = 256,
        context: int = 256,
        layers: int = 4,
        width: int = 256,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        tie_weights: bool = False,
        hf_config: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.95),
        warmup: int | float = 0.05,
        min_lr_ratio: float = 0.1,
        sample_prompt: str = "def ",
        sample_tokens: int = 64,
        sample_top_k: int | None = None,
        sample_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _positive_int("vocab_size", vocab_size)
        _positive_int("context", context)
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"`lr` must be > 0, got {lr!r}.")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}.")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {list(betas)!r}.")
        check_point(warmup, "warmup")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio!r}.")
        if isinstance(sample_tokens, bool) or not isinstance(sample_tokens, int) or sample_tokens < 0:
            raise ValueError(f"`sample_tokens` must be an integer >= 0 (0: no sample), got {sample_tokens!r}.")
        if sample_top_k is not None and (
            isinstance(sample_top_k, bool) or not isinstance(sample_top_k, int) or sample_top_k < 1
        ):
            raise ValueError(f"`sample_top_k` must be an integer >= 1 or None (greedy), got {sample_top_k!r}.")
        if not sample_prompt:
            raise ValueError("`sample_prompt` must be a non-empty text, got ''. HINT: the sample continues it.")
        self.vocab_size = vocab_size
        self.context = context
        self.is_hf = hf_config is not None
        self.backbone: nn.Module
        if hf_config is not None:
            self.backbone = _build_hf(hf_config, vocab_size, context)
        else:
            self.backbone = GPTDecoder(vocab_size, context, layers, width, heads, mlp_ratio, dropout, tie_weights)
        self.example_input_array = torch.zeros(1, context, dtype=torch.long)
        self.tokenizer: Tokenizer = ByteTokenizer()
        self._token_bytes = self.tokenizer.token_bytes()
        self.val_metric = LanguageModelingMetric()
        self.test_metric = LanguageModelingMetric()

    # ---------------------------------------------------------------- model
    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``(batch, tokens, vocab_size)``.

        Raises:
            ValueError: If the input is longer than ``context`` (a Hugging Face backbone would fail with an index
                error in its position embedding).
        """
        if input_ids.shape[-1] > self.context:
            raise ValueError(
                f"The input has {input_ids.shape[-1]} tokens, more than the model's context of {self.context}. HINT: "
                "crop it to the last `context` tokens, or set the data's context <= the model's."
            )
        if self.is_hf:
            return self.backbone(input_ids=input_ids).logits
        return self.backbone(input_ids)

    @torch.no_grad()
    def generate(
        self, prompt: str, max_new_tokens: int, top_k: int | None = None, generator: torch.Generator | None = None
    ) -> list[int]:
        """Token ids of ``prompt`` followed by ``max_new_tokens`` generated ones (greedy, or top-k sampled).

        The model runs in eval mode (restored afterwards) on at most its last ``context`` tokens.
        """
        training = self.training
        self.eval()
        try:
            ids = torch.tensor([self.tokenizer.encode(prompt)], dtype=torch.long, device=self.device)
            for _ in range(max_new_tokens):
                logits = self(ids[:, -self.context :])[0, -1].float()
                if top_k is None:
                    token = logits.argmax().view(1)
                else:
                    values, indices = logits.topk(min(top_k, logits.numel()))
                    probs = values.softmax(-1).cpu()
                    token = indices[torch.multinomial(probs, 1, generator=generator).to(indices.device)]
                ids = torch.cat([ids, token.view(1, 1)], dim=1)
        finally:
            self.train(training)
        return ids[0].tolist()

    # ---------------------------------------------------------------- data checks
    def setup(self, stage: str) -> None:
        """Take the datamodule's tokenizer; check its vocabulary and context against the model's before training."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            if tokenizer.vocab_size > self.vocab_size:
                raise ValueError(
                    f"The tokenizer has {tokenizer.vocab_size} tokens but the model's `vocab_size` is "
                    f"{self.vocab_size}: some ids would have no embedding. HINT: set model vocab_size >= "
                    f"{tokenizer.vocab_size} (the datamodule's tokenizer and vocab_size must match the model's)."
                )
            self.tokenizer = tokenizer
            self._token_bytes = tokenizer.token_bytes()
        data_context = getattr(datamodule, "context", None)
        if isinstance(data_context, int) and data_context > self.context:
            raise ValueError(
                f"The datamodule's `context` ({data_context}) is longer than the model's `context` ({self.context}). "
                f"HINT: set data context <= {self.context}, or model context >= {data_context}."
            )

    # ---------------------------------------------------------------- steps
    def _step(self, batch: Any, metric: LanguageModelingMetric | None) -> Tensor:
        input_ids, targets = batch[0], batch[1]
        losses, mask = next_token_losses(self(input_ids), targets)
        loss = (losses * mask).sum() / mask.sum().clamp(min=1)
        if metric is not None:
            counted = targets.reshape(-1)[mask]
            if self._token_bytes.device != counted.device:
                self._token_bytes = self._token_bytes.to(counted.device)
            metric.update(losses[mask], self._token_bytes[counted])
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._step(batch, None)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)  # one tag: `train/loss`
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, self.val_metric)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, self.test_metric)

    def _log_metric(self, stage: str, metric: LanguageModelingMetric) -> None:
        for name, value in metric.compute().items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "ppl")
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metric("val", self.val_metric)
        hp: Any = self.hparams
        if self.trainer.sanity_checking or not hp.sample_tokens or not self.trainer.is_global_zero:
            return
        logger = next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None:
            return
        generator = torch.Generator().manual_seed(int(hp.sample_seed))
        ids = self.generate(hp.sample_prompt, hp.sample_tokens, hp.sample_top_k, generator)
        text = self.tokenizer.decode(ids)
        logger.experiment.add_text("val/sample", "```\n" + text + "\n```", global_step=self.global_step)

    def on_test_epoch_end(self) -> None:
        self._log_metric("test", self.test_metric)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(-1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the tokenizer in the checkpoint, so a model loaded from it decodes (and is compared) with its own."""
        checkpoint[TOKENIZER_KEY] = tokenizer_state(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the tokenizer; rebuild a structure that lightning-opt changed (removed heads, a QAT graph)."""
        if TOKENIZER_KEY in checkpoint:
            self.tokenizer = tokenizer_from_state(checkpoint[TOKENIZER_KEY])
            self._token_bytes = self.tokenizer.token_bytes()
        from lightning_opt.pruning import restore_pruned_structure
        from lightning_opt.quantization import restore_quantized_structure

        restore_pruned_structure(self, checkpoint)
        restore_quantized_structure(self, checkpoint)

    # ---------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(resolve_step(hp.warmup, total, "warmup"), total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
