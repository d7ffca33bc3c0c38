"""MCTN and MMIN, the baselines of MPLMM's Table 1 that *imagine* a missing modality.

Why: both replace a missing modality by a reconstruction from the available ones, learned with a
reconstruction loss besides the task (where modality substitution feeds zeros and modality dropout
only teaches the model to live with zeros). The papers run them on their own networks; here they
are model transforms on the study's backbone (any :class:`~mmrepro.models.multimodal.MultimodalModel`
with token-sequence encoders), so they differ from MS/MD only in what fills the gap. Every
parameter trains, as in MS/MD.

Shared mechanism (:class:`Imagined`): missing inputs become zeros (never read: ``torch.where``
picks the zeros), every modality is encoded, and each missing modality's tokens are replaced by
the method's reconstruction from the *kept* modalities' tokens before fusion. While training,
each sample also hides, with probability ``rate``, the modalities outside a random incomplete
pattern (:func:`~mmrepro.methods.incomplete.dropout_keep`, as modality dropout does): a hidden
modality is really there, so its encoded tokens (detached: the encoders are not pulled towards
what is easy to reconstruct) are the reconstruction target. The reconstruction losses, times
``weight``, travel as the output's ``aux_loss``, which the training loop adds to the task loss.

- ``mctn`` (Pham et al., AAAI 2019, cyclic translation; generalised from one source modality to
  "translate from the available set"): per target modality X a translator, ``T_X`` queries
  (a learned vector plus sinusoidal positions) attending over the kept modalities' tokens, then
  a residual MLP, gives X's token sequence. Losses: forward translation (MSE to the hidden
  modality's tokens) and the cycle: the translated sequences translated back to each kept
  modality (MSE to its tokens).
- ``mmin`` (Zhao et al., ACL 2021): each modality pooled to one vector (masked mean), the kept
  ones concatenated (missing ones zero) into a cascade residual autoencoder (``blocks``
  autoencoders, each fed the input plus the previous outputs' sum, their sum the imagined
  vector); the imagined vector of a missing modality is repeated over its steps. Losses: forward
  imagination (MSE to the hidden modality's pooled vector) and the backward (cycle) one: a second
  cascade maps the imagined vectors (kept ones zero) back to the kept modalities' pooled vectors.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.incomplete import dropout_keep, substitute
from mmrepro.methods.params import Fraction, NonNegative, PositiveInt
from mmrepro.methods.registry import TRANSFORMS
from mmrepro.methods.transforms import FullFinetune
from mmrepro.models.encoders import masked_mean
from mmrepro.models.multimodal import ModelOutput
from mmrepro.models.transformer import sinusoidal_table


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the entries whose leading indices ``mask`` selects (target detached);
    zero when it selects none."""
    if not bool(mask.any()):
        return pred.sum() * 0.0
    return F.mse_loss(pred[mask], target[mask].detach())


def _some_key(ignore: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ignore`` (``(B, S)``, True = masked key) with a row that masks every key given key 0 back (an
    attention over no key is NaN), and which rows had a key of their own."""
    has = ~ignore.all(1)
    ignore = ignore.clone()
    ignore[:, 0] &= has
    return ignore, has


class Imagined(nn.Module):
    """A backbone whose missing modalities' tokens are reconstructed by ``imagination`` (module docstring)."""

    def __init__(self, backbone: nn.Module, imagination: nn.Module, rate: float, weight: float):
        super().__init__()
        self.backbone, self.imagination, self.rate, self.weight = backbone, imagination, rate, weight
        self.names, self.task_type = backbone.names, backbone.task_type

    def forward(self, batch: Batch) -> ModelOutput:
        present = batch.present
        keep = dropout_keep(present, self.rate) if self.training else present
        batch = substitute(batch, keep)
        tokens, pads = self.backbone.encode(batch)
        filled, loss = self.imagination(tokens, pads, keep, present & ~keep)
        filled = {m: v.masked_fill(pads[m].unsqueeze(-1), 0.0) for m, v in filled.items()}
        out = self.backbone.forward_tokens(filled, pads)
        return replace(out, aux_loss=self.weight * loss) if self.training else out


class Translators(nn.Module):
    """MCTN: per target modality, queries over the kept modalities' tokens -> the target's sequence."""

    def __init__(self, names: list[str], d: int):
        super().__init__()
        self.names = names
        self.query = nn.ParameterDict({m: nn.Parameter(nn.init.trunc_normal_(torch.empty(d), std=0.02)) for m in names})
        self.attn = nn.ModuleDict({m: nn.MultiheadAttention(d, 1, batch_first=True) for m in names})
        self.mlp = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d)) for m in names})

    def translate(self, target: str, steps: int, memory: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
        """``target``'s ``(B, steps, d)`` sequence from ``memory`` ``(B, S, d)``, keys where ``ignore`` masked."""
        q = (self.query[target] + sinusoidal_table(steps + 1, memory.shape[-1])[1:].to(memory)).expand(
            memory.shape[0], -1, -1)
        h = q + self.attn[target](q, memory, memory, key_padding_mask=ignore, need_weights=False)[0]
        return h + self.mlp[target](h)

    def forward(self, tokens, pads, keep, hidden):
        memory = torch.cat([tokens[m] for m in self.names], dim=1)
        ignore, ok = _some_key(torch.cat([pads[m] | ~keep[:, i, None] for i, m in enumerate(self.names)], dim=1))
        made = {m: self.translate(m, tokens[m].shape[1], memory, ignore).masked_fill(pads[m].unsqueeze(-1), 0.0)
                for m in self.names}
        filled = {m: torch.where(keep[:, i, None, None], tokens[m], made[m]) for i, m in enumerate(self.names)}
        if not self.training:
            return filled, memory.new_zeros(())
        loss = sum(_masked_mse(made[m], tokens[m], ok & hidden[:, i]) for i, m in enumerate(self.names))
        # the cycle: the translated (not kept) sequences translated back to each kept modality
        back_memory = torch.cat([made[m] for m in self.names], dim=1)
        back_ignore, ok = _some_key(torch.cat([pads[m] | keep[:, i, None] for i, m in enumerate(self.names)], dim=1))
        for i, m in enumerate(self.names):
            back = self.translate(m, tokens[m].shape[1], back_memory, back_ignore).masked_fill(pads[m].unsqueeze(-1), 0.0)
            loss = loss + _masked_mse(back, tokens[m], ok & keep[:, i])
        return filled, loss


class CascadeAE(nn.Module):
    """MMIN's cascade residual autoencoder: block k sees the input plus the sum of blocks 1..k-1."""

    def __init__(self, width: int, hidden: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
                                    for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(x)
        for block in self.blocks:
            total = total + block(x + total)
        return total


class Imagination(nn.Module):
    """MMIN: pooled modality vectors -> forward and backward cascade autoencoders."""

    def __init__(self, names: list[str], d: int, hidden: int, blocks: int):
        super().__init__()
        self.names = names
        self.forward_ae = CascadeAE(len(names) * d, hidden, blocks)
        self.backward_ae = CascadeAE(len(names) * d, hidden, blocks)

    def forward(self, tokens, pads, keep, hidden):
        pooled = torch.stack([masked_mean(tokens[m], pads[m]) for m in self.names], dim=1)  # (B, M, d)
        kept = keep.unsqueeze(-1).to(pooled.dtype)
        imagined = self.forward_ae((pooled * kept).flatten(1)).view_as(pooled)
        filled = {m: torch.where(keep[:, i, None, None], tokens[m], imagined[:, i, None, :].expand_as(tokens[m]))
                  for i, m in enumerate(self.names)}
        if not self.training:
            return filled, pooled.new_zeros(())
        back = self.backward_ae((imagined * (1 - kept)).flatten(1)).view_as(pooled)
        cycle = (~keep.all(1)).unsqueeze(1) & keep  # kept modalities of samples with something imagined
        return filled, _masked_mse(imagined, pooled, hidden) + _masked_mse(back, pooled, cycle)


class _ImaginationTransform(FullFinetune):
    """Shared checks and wrapping of :class:`MCTN` and :class:`MMIN`."""

    def __init__(self, rate: Fraction, weight: NonNegative):
        self.rate, self.weight = rate, weight

    @staticmethod
    def width(model: nn.Module) -> int:
        """The token width of a model with token-sequence encoders."""
        proj = getattr(model.encoders[model.names[0]], "proj", None) if hasattr(model, "encoders") else None
        if not isinstance(proj, nn.Conv1d):
            raise ValueError("mctn/mmin need a model with token-sequence encoders (model.backbone: a sequence backbone)")
        return proj.out_channels

    def imagination(self, names: list[str], d: int) -> nn.Module:
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        d = self.width(model)
        return Imagined(super().apply(model), self.imagination(model.names, d), self.rate, self.weight)


@TRANSFORMS.register("mctn")
class MCTN(_ImaginationTransform):
    """MCTN: missing modalities translated from the available ones, with a cyclic loss (module docstring)."""

    def __init__(self, rate: Fraction = 0.7, weight: NonNegative = 1.0):
        super().__init__(rate, weight)

    def imagination(self, names: list[str], d: int) -> nn.Module:
        return Translators(names, d)


@TRANSFORMS.register("mmin")
class MMIN(_ImaginationTransform):
    """MMIN: missing modalities imagined by a cascade residual autoencoder, with a cycle loss (module docstring)."""

    def __init__(self, rate: Fraction = 0.7, weight: NonNegative = 1.0, hidden: PositiveInt = 64,
                 blocks: PositiveInt = 5):
        super().__init__(rate, weight)
        self.hidden, self.blocks = hidden, blocks

    def imagination(self, names: list[str], d: int) -> nn.Module:
        return Imagination(names, d, self.hidden, self.blocks)
