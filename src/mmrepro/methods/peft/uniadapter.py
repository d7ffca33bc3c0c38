"""UniAdapter (Lu et al., ICLR 2024) on the frozen multimodal backbone: one adapter per layer depth,
its down-projection shared by every modality, its up-projections modality-specific.

Sources read
------------
- Whether the Wander paper (arXiv 2412.08979) compares against this method could not be checked:
  only its abstract and introduction are in the stored copies; the project's spec names it as one of
  the likely multimodal PEFT baselines.
- The paper's abstract (ICLR 2024 proceedings page; arXiv 2302.06605) and a review page quoting its
  Figure 2 caption: "each modality shares a unified down-projection layer; the cross-modal
  up-projection branch uses knowledge from the textual up-projection layer". The method section
  itself was not in the stored copies.
- The official code, ``RERV/UniAdapter`` (``models/adapter.py``, ``models/vit.py``, ``models/med.py``,
  ``models/blip_retrieval.py``, ``train_retrieval.py``, ``configs/retrieval_flickr.yaml``), read to
  confirm placement, sharing and initialisation. Nothing is copied from it.

What is confirmed (official code, BLIP backbone: a ViT image encoder and a BERT text encoder whose
layers also serve, with their cross-attention switched on, as the cross-modal encoder)
--------------------------------------------------------------------------------------------------
- One adapter per layer index i, the *same module* plugged into layer i of the image encoder, of
  the text encoder and of the cross-modal encoder ("UniAdapters with the same colour share weights").
- Inside it: a LayerNorm on its input (trainable), a down-projection ``d -> b`` and a ReLU (then
  dropout, 0 by default) shared by all uses; separate up-projections ``b -> d`` for text and for
  images; a third, cross-modal up-projection whose output is added to the *textual* up-projection's
  output and passed through a second LayerNorm (the "knowledge sharing" of the cross-modal branch);
  the result is multiplied by a fixed scale 0.1.
- Placement: in parallel with the feed-forward sublayer. It reads the hidden state that enters the
  feed-forward sublayer (after attention) and its output is added to the layer's output.
- In a cross-modal layer (self-attention, then cross-attention over the image tokens, then the
  feed-forward): two adapter terms are added to the layer output, the text-mode adapter on the
  self-attention output, taken *before* the cross-attention ("query residual learning", which keeps
  the language query intact), and the cross-modal branch on the cross-attention output.
- Bottleneck 512 for width 768 in the retrieval configs.
- Initialisation (``init_adapter_weights``): down-projection Kaiming-uniform with zero bias, the
  textual up-projection zero (weight and bias). The visual and cross-modal up-projections are not
  re-initialised there and keep the backbone initialiser's N(0, 0.02).

Our adaptation to this project's backbones (per-modality transformer encoders + a fusion module)
-----------------------------------------------------------------------------------------------
M modalities instead of two: the adapter of depth l (:class:`UniAdapterUnit`) has one LayerNorm, one
shared down-projection and M modality-specific up-projections; it is plugged into layer l of every
modality encoder, each modality using its own up-projection (BLIP's image/text pair is M = 2).
The encoders must share one width d (they do in this project), since the down-projection is shared.

- Encoder layers (``nn.TransformerEncoderLayer``, or the presets' MulT ``EncoderLayer``; pre-norm
  here): the adapter reads ``x`` after the
  attention sublayer and its output joins the feed-forward's residual sum,
  ``x + ff(norm2(x)) + s * up_m(drop(relu(down(LN(x)))))`` (post-norm layers: added after ``norm2``,
  as in BERT).
- ``mult`` fusion (MulT-style): its crossmodal blocks play BLIP's cross-modal encoder. The blocks of
  fusion depth j (all M (M - 1) source -> target pairs) share one unit with a cross-modal branch.
  Our blocks have no self-attention before the cross-attention, so the query residual reads the
  block's input (the target tokens) through the target modality's up-projection, and the cross-modal
  branch reads the cross-attention output: ``out = block(target, source) + s * up_t(z(target)) +
  s * LN_x(up_x(z(h)) + up_t(z(h)))`` with ``z = drop(relu(down(LN(.))))`` and ``h`` the
  cross-attention output; the target modality's up-projection stands in for BLIP's textual one (the
  query side). The per-target self-attention layers after the merge get one more unit, shared by
  all targets, used like an encoder unit.
- ``late`` fusion (and ``casp_late``'s) has no transformer layer, and the single-stream ``concat``
  fusion (``cggm_msa``'s too: one transformer over all modalities' tokens, no modality-specific
  path to plug the up-projections into) is left frozen: for these, only the encoders are adapted.
  Backbones without per-modality encoder layers (``casp_early``, ``mplmm_mult``) are refused.
- Initialisation: every up-projection (modality and cross-modal) starts at zero, so the adapted
  model starts exactly as the frozen backbone (the cross-modal LayerNorm of a zero vector is its
  zero bias). This is the evident intent of the official ``init_adapter_weights``, which zeroes the
  one up-projection it knows of; the official visual and cross-modal up-projections start at
  N(0, 0.02) instead, so its cross-modal branch is not zero at the start.
- Defaults: ``bottleneck=16`` (as this project's bottleneck adapters; the official 512 is for width
  768), ``scale=0.1`` and ``dropout=0`` (official). The prediction head trains by default
  (``train_head``), as for every PEFT baseline here.

Trainable parameters
--------------------
With d the width, b the bottleneck, M modalities, L the encoder depth, FL the crossmodal depth of
the ``mult`` fusion::

    P_unit  = 2 d + (d b + b) + M (b d + d)          # LayerNorm, shared down, M modality ups
    P_cross = P_unit + (b d + d) + 2 d                # + cross-modal up and its LayerNorm
    P = L P_unit                                      # late and concat fusion
      | L P_unit + FL P_cross + P_unit                # mult fusion (crossmodal units + self-attention unit)
      (+ H, the prediction head, if train_head)

``UniAdapter.param_count(model)`` evaluates it on a backbone (the same before and after ``apply``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.methods.params import Positive, PositiveInt, Rate
from mmrepro.methods.peft.baselines import head_count
from mmrepro.methods.registry import TRANSFORMS
from mmrepro.methods.transforms import ModelTransform
from mmrepro.models.fusion import CrossmodalBlock, CrossmodalFusion
from mmrepro.models.stages import staged_encoders
from mmrepro.models.transformer import EncoderLayer


class UniAdapterUnit(nn.Module):
    """One depth's adapter: input LayerNorm, shared down-projection, M modality up-projections and,
    with ``cross``, a cross-modal up-projection and its LayerNorm. Up-projections start at zero."""

    def __init__(self, d: int, bottleneck: int, n_modalities: int, *, cross: bool, scale: float,
                 dropout: float):
        super().__init__()
        self.scale, self.dropout = float(scale), float(dropout)
        self.norm = nn.LayerNorm(d)
        self.down = nn.Linear(d, bottleneck)
        self.up = nn.ModuleList(nn.Linear(bottleneck, d) for _ in range(n_modalities))
        if cross:
            self.cross_up = nn.Linear(bottleneck, d)
            self.cross_norm = nn.LayerNorm(d)
        self.reset_parameters()

    @property
    def has_cross(self) -> bool:
        return hasattr(self, "cross_up")

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        for lin in [*self.up, *([self.cross_up] if self.has_cross else [])]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(F.relu(self.down(self.norm(x))), p=self.dropout, training=self.training)

    def unimodal(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """``s * up_m(z(x))``: the modality-m branch."""
        return self.scale * self.up[m](self._bottleneck(x))

    def crossmodal(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """``s * LN_x(up_x(z) + up_m(z))``: the cross-modal branch with query modality m."""
        z = self._bottleneck(x)
        return self.scale * self.cross_norm(self.cross_up(z) + self.up[m](z))


def unit_param_count(d: int, bottleneck: int, n_modalities: int, cross: bool) -> int:
    """``P_unit`` (or ``P_cross`` with ``cross``) of the module docstring."""
    b = bottleneck
    n = 2 * d + (d * b + b) + n_modalities * (b * d + d)
    return n + ((b * d + d) + 2 * d if cross else 0)


class UniAdaptedEncoderLayer(nn.TransformerEncoderLayer):
    """An ``nn.TransformerEncoderLayer`` with a UniAdapter branch beside its feed-forward sublayer.

    Set by :meth:`UniAdapter.apply` (class swap); ``_uniadapter = (unit, modality index)`` refers to a
    unit registered once on the model (``model.uniadapter``), so it is shared, not copied.
    """

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        unit, m = self._uniadapter
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x)) + unit.unimodal(x, m)
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x)) + unit.unimodal(x, m)


class UniAdaptedCrossmodalBlock(CrossmodalBlock):
    """A ``CrossmodalBlock`` plus the query-residual and cross-modal UniAdapter branches."""

    def forward(self, target: torch.Tensor, source: torch.Tensor, source_pad: torch.Tensor) -> torch.Tensor:
        unit, m = self._uniadapter
        kv = self.norm_kv(source)
        h = target + self.attn(self.norm_q(target), kv, kv, key_padding_mask=source_pad, need_weights=False)[0]
        return h + self.ff(self.norm_ff(h)) + unit.unimodal(target, m) + unit.crossmodal(h, m)


class UniAdaptedPresetLayer(EncoderLayer):
    """The presets' MulT ``EncoderLayer`` (pre-norm) with the UniAdapter branch beside its feed-forward."""

    def forward(self, x: torch.Tensor, source: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        unit, m = self._uniadapter
        x = self.attend(x, source, mask, causal)
        return self.feed_forward(x) + unit.unimodal(x, m)


#: each plain encoder-layer class and its adapted class
ENCODER_LAYERS = {nn.TransformerEncoderLayer: UniAdaptedEncoderLayer, EncoderLayer: UniAdaptedPresetLayer}


def _encoder_layers(model: nn.Module) -> dict[str, list[nn.Module]]:
    return {m: list(enc.layers) for m, enc in staged_encoders(model, "uniadapter").items()}


def _width(model: nn.Module) -> int:
    widths = {enc.width for enc in staged_encoders(model, "uniadapter").values()}
    if len(widths) != 1:
        raise ValueError(f"uniadapter: the shared down-projection needs encoders of one width, got {sorted(widths)}")
    return widths.pop()


def _mult_depth(model: nn.Module) -> int | None:
    """Crossmodal depth FL of a ``mult`` fusion, or None for other fusions."""
    if not isinstance(model.fusion, CrossmodalFusion):
        return None
    return max((len(blocks) for blocks in model.fusion.cross.values()), default=0)


@TRANSFORMS.register("uniadapter")
class UniAdapter(ModelTransform):
    """Freeze the backbone and add UniAdapter units (see the module docstring for the formula)."""

    needs_modality_layers = True

    def __init__(self, bottleneck: PositiveInt = 16, scale: Positive = 0.1, dropout: Rate = 0.0,
                 train_head: bool = True):
        self.bottleneck, self.scale, self.dropout = int(bottleneck), float(scale), float(dropout)
        self.train_head = bool(train_head)

    def param_count(self, model: nn.Module) -> int:
        d, M, b = _width(model), len(model.names), self.bottleneck
        depth = max(len(layers) for layers in _encoder_layers(model).values())
        n = depth * unit_param_count(d, b, M, cross=False)
        fl = _mult_depth(model)
        if fl is not None:
            n += fl * unit_param_count(d, b, M, cross=True) + unit_param_count(d, b, M, cross=False)
        return n + (head_count(model) if self.train_head else 0)

    def _unit(self, d: int, M: int, cross: bool, like: torch.Tensor) -> UniAdapterUnit:
        unit = UniAdapterUnit(d, self.bottleneck, M, cross=cross, scale=self.scale, dropout=self.dropout)
        return unit.to(device=like.device, dtype=like.dtype)

    def apply(self, model: nn.Module) -> nn.Module:
        if hasattr(model, "uniadapter"):
            raise ValueError("uniadapter: the model already has UniAdapter units")
        d, M, like = _width(model), len(model.names), next(model.parameters())
        layers = _encoder_layers(model)
        fl = _mult_depth(model)
        # (module, adapted class, unit key, unit index, modality index) for every adapted layer
        plan = [(layer, ENCODER_LAYERS.get(type(layer), UniAdaptedEncoderLayer), "encoder", l, i)
                for i, m in enumerate(model.names) for l, layer in enumerate(layers[m])]
        if fl is not None:
            for key, blocks in model.fusion.cross.items():
                t = model.names.index(key.split("->")[1])
                plan += [(block, UniAdaptedCrossmodalBlock, "cross", j, t) for j, block in enumerate(blocks)]
            for t_name, enc in model.fusion.self_attn.items():
                plan += [(layer, UniAdaptedEncoderLayer, "fusion_self", 0, model.names.index(t_name))
                         for layer in enc.layers]
        for module, cls, *_ in plan:  # check everything before changing anything
            if type(module) is not cls.__mro__[1]:
                raise TypeError(f"uniadapter: expected a plain {cls.__mro__[1].__name__}, got "
                                f"{type(module).__name__} (was the model transformed before?)")
        depth = max(len(ls) for ls in layers.values())
        units = nn.ModuleDict({"encoder": nn.ModuleList(self._unit(d, M, False, like) for _ in range(depth))})
        if fl is not None:
            units["cross"] = nn.ModuleList(self._unit(d, M, True, like) for _ in range(fl))
            units["fusion_self"] = nn.ModuleList([self._unit(d, M, False, like)])
        model.requires_grad_(False)
        for module, cls, key, index, m in plan:
            module.__class__ = cls
            module._uniadapter = (units[key][index], m)  # a tuple: the unit is not registered under the layer
        model.uniadapter = units  # registered once, here
        units.requires_grad_(True)
        if self.train_head:
            model.head.requires_grad_(True)
        return model
