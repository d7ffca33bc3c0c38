"""Unimodal probes: one light classifier per modality on that modality's detached encoder tokens.

Balance methods use them to measure how much each modality's encoder has learned so far
("utilisation"): CGGM steers gradients with their batch accuracies, other methods only log
their validation accuracy per epoch. The probes read ``ModelOutput.tokens`` **detached**, own
their optimizer and are trained on the task loss; they never send gradients into the model,
and the model never sends gradients into them.

One probe follows CGGM's classifier (``models/msamodel.py`` of the official code): a small
pre-norm transformer over the token sequence (inputs scaled by sqrt(d), sinusoidal positions,
embedding dropout, a 4d feed-forward, a final LayerNorm), the first time step, a hidden linear
layer, ReLU and an ``out`` linear layer. The official classifier applies its hidden linear layer
twice in a row (``relu(hidden(hidden(x)))``); ``faithful_double_hidden=True`` keeps that quirk,
``False`` applies it once. Differences from the official classifier: padded time steps are
masked out of attention here (the official data are fixed-length and unmasked), one dropout rate
stands for the official code's separate attention / ReLU / residual / embedding rates, and
positions are a plain sinusoidal table (the official fairseq table skips positions of all-zero
inputs).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.models.dropout import TransformerEncoderLayer, dropout
from mmrepro.models.encoders import attention_mask, padding_mask
from mmrepro.models.multimodal import ModelOutput
from mmrepro.models.stages import BLOCK_TYPES, block_parts


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """``(length, dim)`` fixed sinusoidal table: sines in the first half, cosines in the second."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(1, length + 1, device=device, dtype=torch.float32)[:, None] * freq[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(length, 1, device=device)], dim=1)
    return table


class UnimodalClassifier(nn.Module):
    """Transformer over ``(B, T, d)`` tokens, first time step, hidden linear, ReLU, ``out`` linear."""

    def __init__(self, d_model: int, out_dim: int, layers: int, heads: int, dropout: float,
                 faithful_double_hidden: bool = True):
        super().__init__()
        self.scale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)
        layer = TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=dropout,
                                        batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.hidden = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, out_dim)
        self.faithful_double_hidden = faithful_double_hidden

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, T, d)`` tokens and ``(B,)`` lengths -> ``(B, out_dim)``."""
        mask = attention_mask(padding_mask(lengths, tokens.shape[1]))
        h = self.scale * tokens + sinusoidal_positions(tokens.shape[1], tokens.shape[2], tokens.device)
        h = self.norm(self.transformer(dropout(h, self.dropout.p, self.training), src_key_padding_mask=mask))[:, 0]
        h = self.hidden(h)
        if self.faithful_double_hidden:
            h = self.hidden(h)
        return self.out(torch.relu(h))


def batch_accuracy(pred: torch.Tensor, y: torch.Tensor, task_type: str) -> torch.Tensor:
    """Number of correct predictions: sign agreement (``> 0``, zero counts as negative) for
    regression, as the official ``train_eval_senti``; argmax for classes."""
    if task_type == "regression":
        return ((pred > 0) == (y > 0)).sum()
    return (pred.argmax(-1) == y).sum()


class UnimodalProbes(nn.Module):
    """One :class:`UnimodalClassifier` per modality, with its own optimizer.

    ``step`` trains all probes one step on the current batch (the sum over modalities of the
    task loss, as the official code) and returns each probe's accuracy on that batch, computed
    from the same forward pass (before the update). ``evaluate`` gives each probe's accuracy on a
    loader, with the model and the probes in eval mode.
    """

    def __init__(self, names: list[str], d_model: int, out_dim: int, task_type: str, *, layers: int = 2,
                 heads: int = 1, dropout: float = 0.0, lr: float = 5e-4, weight_decay: float = 0.0,
                 optim: str = "Adam", faithful_double_hidden: bool = True):
        super().__init__()
        self.names = list(names)
        self.task_type = task_type
        self.probes = nn.ModuleDict({m: UnimodalClassifier(d_model, out_dim, layers, heads, dropout,
                                                           faithful_double_hidden) for m in self.names})
        self.optimizer = getattr(torch.optim, optim)(self.parameters(), lr=lr, weight_decay=weight_decay)

    @classmethod
    def for_model(cls, model: nn.Module, *, heads: int | None = None, **kw) -> "UnimodalProbes":
        """Probes sized for a :class:`~mmrepro.models.multimodal.MultimodalModel` (width, outputs,
        modalities; ``heads=None`` takes the model encoders' head count), on the model's device."""
        d_model = model.encoders[model.names[0]].proj.out_channels
        if heads is None:  # the backbone's first transformer layer, wherever it sits (encoder or fusion)
            heads = block_parts(next(m for m in model.modules() if isinstance(m, BLOCK_TYPES))).attention.num_heads
        out_dim = model.out_dim if hasattr(model, "out_dim") else model.head.out.out_features  # late-heads models
        probes = cls(model.names, d_model, out_dim, model.task_type, heads=heads, **kw)
        return probes.to(next(model.parameters()).device)

    def forward(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-modality predictions (shaped as the model's ``pred``) from the detached tokens."""
        preds = {}
        for m in self.names:
            p = self.probes[m](out.tokens[m].detach(), batch.lengths[m])
            preds[m] = p.squeeze(-1) if self.task_type == "regression" else p
        return preds

    def out_weight(self, m: str) -> torch.Tensor:
        """The ``out`` layer weight ``(out_dim, d)`` of modality ``m``'s probe."""
        return self.probes[m].out.weight

    def step(self, out: ModelOutput, batch: Batch, loss_fn) -> dict[str, float]:
        """One optimizer step of every probe on this batch; returns each probe's batch accuracy.

        The gradients of this step stay in the probes' ``.grad`` until the next ``step``.
        """
        self.train()
        self.optimizer.zero_grad(set_to_none=True)
        preds = self(out, batch)
        loss = sum(loss_fn(preds[m], batch.y) for m in self.names)
        loss.backward()
        n = max(len(batch), 1)
        acc = {m: float(batch_accuracy(preds[m].detach(), batch.y, self.task_type)) / n for m in self.names}
        self.optimizer.step()
        return acc

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        """Each probe's accuracy over ``loader`` (model and probes in eval mode, then restored)."""
        was_model, was_self = model.training, self.training
        model.eval()
        self.eval()
        device = next(self.parameters()).device
        correct = {m: 0.0 for m in self.names}
        n = 0
        try:
            for batch in loader:
                batch = batch.to(device)
                preds = self(model(batch), batch)
                for m in self.names:
                    correct[m] += float(batch_accuracy(preds[m], batch.y, self.task_type))
                n += len(batch)
        finally:
            model.train(was_model)
            self.train(was_self)
        return {m: correct[m] / n if n else float("nan") for m in self.names}
