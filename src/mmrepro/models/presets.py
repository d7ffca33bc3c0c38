"""The papers' own backbones, wired from :class:`mmrepro.models.transformer.TransformerEncoder`.

Each preset is the official model's layout (read from the authors' code) as a
:class:`~mmrepro.models.multimodal.MultimodalModel` (``encoders`` per modality, a ``fusion``, a
``head`` with its ``out`` layer), so every hook and adapter that works on the model's parts
works on them. ``enc(d, L) = L (12 d^2 + 13 d) + 2 d`` is one encoder's parameter count, ``D_m``
the input widths, ``M`` the modalities, ``K`` the outputs (1 for regression):

- ``casp_late`` (CASP's late fusion; Wander's MOSI base): per modality a 1x1 Conv1d with bias
  ``D_m -> d`` and an encoder of ``layers``; each encoder's output at step 0, concatenated
  (``M d``: the ``representation`` CASP contrasts, also ``fused``) -> head ``Linear(M d, d)`` + ReLU,
  residual MLP ``d -> d -> d``, ``Linear(d, K)``.
  Parameters ``sum_m (D_m d + d) + M enc(d, L) + (M d^2 + d) + 2 (d^2 + d) + (d + 1) K``.
- ``casp_early``: the projected sequences concatenated along time, one encoder of ``layers``,
  step 0 (``fused`` = ``representation``, ``d``) -> residual MLP -> ``Linear(d, K)``.
  Parameters ``sum_m (D_m d + d) + enc(d, L) + 2 (d^2 + d) + (d + 1) K``.
- ``cggm_msa`` (CGGM's MOSI/IEMOCAP "MSA model") and ``cggm_food`` (its Food-101 model: the same
  wiring for image + text, with the Food run script's dropouts): ``casp_late``'s per-modality
  encoders, then their full outputs concatenated along time into a fusion encoder of
  ``fusion_layers`` layers (the code's ``nlevels - 2``), step 0 -> residual MLP -> ``Linear(d, K)``.
  CGGM's unimodal classifiers belong to its training hook, not here. Parameters
  ``sum_m (D_m d + d) + M enc(d, L) + enc(d, F) + 2 (d^2 + d) + (d + 1) K``. (The official Food
  model projects the text with the image's Conv1d and leaves its text Conv1d unused; here each
  modality uses its own: same parameter count.)
- ``mplmm_mult`` (MulT as MPLMM uses it): per modality a 1x1 Conv1d without bias ``D_m -> d``
  (the first modality's raw input, MulT's text, gets the embedding dropout first, as in the code:
  ``drop_inputs``);
  for every ordered pair a crossmodal encoder (target ``t`` queries source ``s``, ``layers``);
  per target a memory encoder of width ``(M-1) d`` and ``max(layers, 3)`` layers over the
  concatenation of its crossmodal outputs (sources in modality order); each memory output at the
  LAST step, concatenated (``W = M (M-1) d``) -> residual MLP ``W -> W -> W`` -> ``Linear(W, K)``.
  MulT's causal mask is on by default. Parameters besides the input projections and output layer
  ``M (M-1) enc(d, L) + M enc((M-1) d, max(L, 3)) + 2 (W^2 + W)``.

Stage API of ``mplmm_mult`` (:class:`MulTModel`), for model transforms such as MPLMM's prompts:

- ``projected, pads = model.project(batch)``: per modality the ``(B, T_m, d)`` projected sequence
  and its ``(B, T_m)`` padding mask (True = padded). A transform may replace or add to any
  ``projected[m]`` (e.g. a generated missing modality, or signal prompts added) keeping its shape.
  ``model.drop_inputs(batch)`` is the batch as the projections read it (the first modality through
  the embedding dropout when training); ``project(dropped, dropped=True)`` projects such a batch
  without drawing the dropout again, so a transform can read the same dropped input (MPLMM's
  generators, as the code).
- ``model.forward_from_projected(projected, pads, memory_suffix=None) -> ModelOutput``: the
  crossmodal and memory transformers and the head. ``memory_suffix[t]`` ``(B, l, (M-1) d)`` is
  appended at the END of target ``t``'s memory input (after the crossmodal streams, before the
  memory transformer's scaling and positions), so the readout, the memory output's last
  position, is a suffix token. ``model.fusion.memory_dim`` is that width ``(M-1) d``.
- ``model(batch)`` is ``forward_from_projected(*model.project(batch))``.
- ``model.max_lengths[m]``: the schema's (maximum) sequence length ``T_m`` of each modality.

Config: ``model.backbone`` names the preset; ``d_model``, ``layers``, ``heads`` and (cggm)
``fusion_layers`` come from the model config; ``model.dropouts`` overrides single sites of the
preset defaults below (the official run scripts'); ``model.causal`` (None = preset default) and
``model.position_padding`` (the official position rule) as in :mod:`mmrepro.models.transformer`.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.data.schema import DatasetSchema, TaskSpec
from mmrepro.models.dropout import dropout
from mmrepro.models.encoders import attention_mask, padding_mask
from mmrepro.models.multimodal import MultimodalModel, PredictionHead
from mmrepro.models.output import ModelOutput
from mmrepro.models.transformer import Dropouts, TransformerEncoder, encoder_params

#: Official run-script dropouts per preset (CASP: its training script; CGGM: run/mosi_run.py and
#: run/food_run.py; MPLMM: main.py) and whether MulT's causal mask is on.
PRESET_DEFAULTS: dict[str, tuple[Dropouts, bool]] = {
    "casp_late": (Dropouts(attn=0.1, relu=0.1, res=0.1, embed=0.25, out=0.0), False),
    "casp_early": (Dropouts(attn=0.1, relu=0.1, res=0.1, embed=0.25, out=0.0), False),
    "cggm_msa": (Dropouts(attn=0.15, relu=0.15, res=0.1, embed=0.2, out=0.1), False),
    "cggm_food": (Dropouts(attn=0.2, relu=0.15, res=0.15, embed=0.2, out=0.1), False),
    "mplmm_mult": (Dropouts(attn=0.1, relu=0.1, res=0.1, embed=0.25, out=0.1), True),
}
PRESETS = tuple(PRESET_DEFAULTS)
#: Presets whose per-modality encoders only project their inputs (the transformer reads every modality
#: at once): methods that adapt per-modality transformer encoders cannot run on them.
JOINT_PRESETS = ("casp_early", "mplmm_mult")


def key_padding(pad: torch.Tensor) -> torch.Tensor | None:
    """The keys to mask for a ``(B, T)`` padding mask; None when nothing is padded (no mask built)."""
    return attention_mask(pad) if bool(pad.any()) else None


class SequenceEncoder(nn.Module):
    """A modality's input stage: a 1x1 Conv1d to ``d`` (run as a matrix product), optionally an encoder.

    Returns the ``(B, T, d)`` tokens (padded steps zeroed when there are any) and the padding mask.
    A :class:`~mmrepro.models.stages.StagedEncoder` (no layers without ``transformer``); ``max_len``
    is the schema's sequence length.
    """

    def __init__(self, in_dim: int, d: int, bias: bool, max_len: int, transformer: TransformerEncoder | None = None):
        super().__init__()
        self.proj = nn.Conv1d(in_dim, d, kernel_size=1, bias=bias)
        self.transformer = transformer
        self.max_len = max_len

    @property
    def width(self) -> int:
        return self.proj.out_channels

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.layers if self.transformer is not None else nn.ModuleList()

    def embed(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        pad = padding_mask(lengths, x.shape[1])
        keys = key_padding(pad)
        if keys is not None:
            x = x.masked_fill(pad.unsqueeze(-1), 0.0)
        h = F.linear(x, self.proj.weight.squeeze(-1), self.proj.bias)
        return (h if self.transformer is None else self.transformer.embed(h)), pad, keys

    def run_layer(self, i: int, h: torch.Tensor, key_pad: torch.Tensor | None) -> torch.Tensor:
        mask, causal = self.transformer._mask(h.shape[1], h.shape[1], key_pad, h.device)
        return self.transformer.layers[i](h, None, mask, causal)

    def finish(self, h: torch.Tensor, pad: torch.Tensor, key_pad: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.transformer is not None:
            h = self.transformer.layer_norm(h)
        if key_pad is not None:
            h = h.masked_fill(pad.unsqueeze(-1), 0.0)
        return h, pad

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, pad, keys = self.embed(x, lengths)
        if self.transformer is not None:
            h = self.transformer.encode(h, keys)
        return (h if keys is None else h.masked_fill(pad.unsqueeze(-1), 0.0)), pad


class FirstSteps(nn.Module):
    """CASP's late fusion: every modality's encoder output at step 0, concatenated."""

    modality_blocks = True

    def __init__(self, names: list[str], d: int):
        super().__init__()
        self.names, self.out_dim = names, d * len(names)

    def forward(self, tokens: dict[str, torch.Tensor], pads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tokens[m][:, 0] for m in self.names], dim=-1)


class TimeConcatFusion(nn.Module):
    """The modalities' sequences concatenated along time, one encoder, its output at step 0."""

    modality_blocks = False

    def __init__(self, names: list[str], transformer: TransformerEncoder, d: int):
        super().__init__()
        self.names, self.transformer, self.out_dim = names, transformer, d

    def forward(self, tokens: dict[str, torch.Tensor], pads: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.cat([tokens[m] for m in self.names], dim=1)
        pad = torch.cat([pads[m] for m in self.names], dim=1)
        return self.transformer(h, key_pad=key_padding(pad))[:, 0]


class MulTFusion(nn.Module):
    """MulT's crossmodal transformers (every ordered pair) and memory transformers (per target)."""

    modality_blocks = True   # one memory readout per target modality

    def __init__(self, names: list[str], d: int, heads: int, layers: int, dropouts: Dropouts, causal: bool,
                 position_padding: bool):
        super().__init__()
        self.names, self.position_padding = names, position_padding
        self.memory_dim = d * (len(names) - 1)
        self.out_dim = self.memory_dim * len(names)
        self.cross = nn.ModuleDict({
            f"{s}->{t}": TransformerEncoder(d, heads, layers, dropouts, causal, position_padding)
            for t in names for s in names if s != t})
        self.memory = nn.ModuleDict({
            t: TransformerEncoder(self.memory_dim, heads, max(layers, 3), dropouts, causal, position_padding)
            for t in names})

    def forward(self, tokens: dict[str, torch.Tensor], pads: dict[str, torch.Tensor],
                memory_suffix: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        keys = {m: key_padding(pads[m]) for m in self.names}
        last = []
        for t in self.names:
            h = torch.cat([self.cross[f"{s}->{t}"](tokens[t], tokens[s], key_pad=keys[s])
                           for s in self.names if s != t], dim=-1)
            key = keys[t]
            if memory_suffix is not None and t in memory_suffix:
                suffix = memory_suffix[t]
                h = torch.cat([h, suffix.to(h.dtype)], dim=1)
                if key is not None:
                    key = torch.cat([key, key.new_zeros(key.shape[0], suffix.shape[1])], dim=1)
            last.append(self.memory[t](h, key_pad=key)[:, -1])
        return torch.cat(last, dim=-1)


class MulTModel(MultimodalModel):
    """``mplmm_mult``: :class:`MultimodalModel` whose encoders only project, with MPLMM's two stages.

    ``input_dropout``: MulT's embedding dropout on the first modality's raw input (the code's text),
    drawn once per forward by :meth:`drop_inputs`; ``max_lengths`` the schema's lengths.
    """

    def __init__(self, encoders: dict[str, SequenceEncoder], fusion: MulTFusion, head: PredictionHead, task: TaskSpec,
                 input_dropout: float, max_lengths: dict[str, int]):
        super().__init__(encoders, fusion, head, task)
        self.input_dropout, self.max_lengths = input_dropout, max_lengths

    def drop_inputs(self, batch: Batch) -> Batch:
        """The batch as the projections read it: the first modality's raw features through the
        embedding dropout (training only; the other modalities as they are)."""
        if not (self.training and self.input_dropout):
            return batch
        first = self.names[0]
        return replace(batch, x={**batch.x, first: dropout(batch.x[first], self.input_dropout, True)})

    def encode(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return super().encode(self.drop_inputs(batch))

    def project(self, batch: Batch, dropped: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per modality the ``(B, T_m, d)`` projected input and its ``(B, T_m)`` padding mask;
        ``dropped``: ``batch`` comes from :meth:`drop_inputs` already (no second dropout draw)."""
        return super().encode(batch) if dropped else self.encode(batch)

    def forward_from_projected(self, projected: dict[str, torch.Tensor], pads: dict[str, torch.Tensor],
                               memory_suffix: Mapping[str, torch.Tensor] | None = None) -> ModelOutput:
        """Crossmodal + memory transformers and head; ``memory_suffix[t]`` ``(B, l, memory_dim)`` tokens
        are appended to target ``t``'s memory input, whose last position is read out."""
        return self.forward_tokens(projected, pads, memory_suffix=memory_suffix)


def preset_params(name: str, dims: list[int], d: int, layers: int, fusion_layers: int, out_dim: int) -> int:
    """The formula of each preset's parameter count (module docstring), for tests and reports."""
    m, head = len(dims), 2 * (d * d + d) + (d + 1) * out_dim
    proj = sum(dims) * d + m * d
    if name == "casp_late":
        return proj + m * encoder_params(d, layers) + m * d * d + d + head
    if name == "casp_early":
        return proj + encoder_params(d, layers) + head
    if name in ("cggm_msa", "cggm_food"):
        return proj + m * encoder_params(d, layers) + encoder_params(d, fusion_layers) + head
    if name == "mplmm_mult":
        w = m * (m - 1) * d
        return (sum(dims) * d + m * (m - 1) * encoder_params(d, layers)
                + m * encoder_params((m - 1) * d, max(layers, 3)) + 2 * (w * w + w) + (w + 1) * out_dim)
    raise ValueError(f"unknown preset {name!r}; known: {list(PRESETS)}")


def preset_dropouts(name: str, overrides: Mapping[str, float | None] | None) -> Dropouts:
    """The preset's official dropouts with the config's sites over them; bad sites or rates raise."""
    default = asdict(PRESET_DEFAULTS[name][0])
    unknown = sorted(set(overrides or {}) - set(default))
    if unknown:
        raise ValueError(f"model.dropouts: unknown site(s) {unknown}; known: {sorted(default)}")
    try:
        return Dropouts(**{**default, **{k: v for k, v in (overrides or {}).items() if v is not None}})
    except ValueError as e:
        raise ValueError(f"model.dropouts: {e}") from None


def check_widths(name: str, d_model: int, heads: int) -> None:
    """Every transformer width of a preset (``d_model``, and MulT's ``(M-1) d_model``) splits into heads."""
    if d_model % heads:
        raise ValueError(f"model.heads={heads} must divide the transformer width {d_model} of {name!r}")


def build_preset(name: str, schema: DatasetSchema, task: TaskSpec, names: list[str], *, d_model: int, layers: int,
                 heads: int, fusion_layers: int, dropouts: Mapping[str, float | None] | None = None,
                 causal: bool | None = None, position_padding: bool = False) -> MultimodalModel:
    """Build preset ``name`` for ``names`` of ``schema``; errors name the config key at fault."""
    for m in names:
        if schema.modality(m).dim is None:
            raise ValueError(f"model.backbone {name!r} needs token sequences; modality {m!r} of dataset "
                             f"{schema.name!r} is an array of shape {schema.modality(m).shape}")
    check_widths(name, d_model, heads)
    if name == "mplmm_mult" and len(names) < 2:
        raise ValueError(f"model.backbone 'mplmm_mult' needs at least 2 modalities, got {names}")
    drop = preset_dropouts(name, dropouts)
    causal = PRESET_DEFAULTS[name][1] if causal is None else causal
    out_dim = 1 if task.type == "regression" else task.num_classes

    def encoder(n_layers: int) -> TransformerEncoder:
        return TransformerEncoder(d_model, heads, n_layers, drop, causal, position_padding)

    dims = {m: schema.modality(m).dim for m in names}
    lengths = {m: schema.modality(m).length for m in names}
    if name == "mplmm_mult":
        encoders = {m: SequenceEncoder(dims[m], d_model, bias=False, max_len=lengths[m]) for m in names}
        fusion = MulTFusion(names, d_model, heads, layers, drop, causal, position_padding)
        return MulTModel(encoders, fusion, PredictionHead(fusion.out_dim, out_dim, drop.out), task,
                         input_dropout=drop.embed, max_lengths=lengths)
    if name == "casp_early":
        encoders = {m: SequenceEncoder(dims[m], d_model, bias=True, max_len=lengths[m]) for m in names}
        fusion = TimeConcatFusion(names, encoder(layers), d_model)
        return MultimodalModel(encoders, fusion, PredictionHead(d_model, out_dim, drop.out), task)
    encoders = {m: SequenceEncoder(dims[m], d_model, bias=True, max_len=lengths[m], transformer=encoder(layers))
                for m in names}
    if name == "casp_late":
        fusion = FirstSteps(names, d_model)
        return MultimodalModel(encoders, fusion, PredictionHead(fusion.out_dim, out_dim, drop.out, hidden=d_model),
                               task)
    fusion = TimeConcatFusion(names, encoder(fusion_layers), d_model)
    return MultimodalModel(encoders, fusion, PredictionHead(d_model, out_dim, drop.out), task)
