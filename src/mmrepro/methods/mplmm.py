"""MPLMM (Guo, Jin, Zhao, ACL 2024): prompts that let a frozen MulT cope with missing modalities.

Why: a MulT pretrained on complete data sees a new dataset where any modality may be missing.
MPLMM keeps that backbone frozen and learns three small families of prompts (plus fresh input
projections and output layer, the dataset-specific parts), so each missing pattern is handled
without retraining the backbone or one model per pattern.

What each family does, on the ``mplmm_mult`` preset's stage API (:mod:`mmrepro.models.presets`):

- ``generative``: a missing modality X is *generated* instead of read. Every available modality
  Y is mapped from its raw features to width ``d`` by a 1x1 convolution and GELU owned by the
  pair (Y -> X); X's generative prompt (``l`` learned tokens of width ``d``) and these mapped
  sequences are joined along time, and a learned map over the time axis (one per missing X and
  available set A, with bias, then GELU) turns the ``l + sum_{Y in A} T_Y`` steps into X's ``T_X``
  steps. It learns from the task loss alone (no reconstruction loss), as in the paper. Without
  this family a missing modality's projected input is zeros. ``generator_input``: ``dropped``
  (default, the released code) feeds the generators the first modality (MulT's text) after the
  backbone's embedding dropout, the very tensor its projection reads (so in training the text ->
  audio and text -> vision maps see the dropped text; in evaluation nothing is dropped); ``raw``
  feeds them the features before that dropout. The paper does not say; the code's choice is the default.
- ``signal``: per modality two ``(T_X, d)`` prompts, "present" and "missing"; the matching one is
  added to the modality's projected (or generated) input before the crossmodal transformers.
- ``type``: per memory branch (one per target modality) a prompt ``P_t`` of ``l`` tokens of
  width ``d``, and per modality a ``(T_X, W)`` matrix ``m_X`` (``W = (M-1) d``, the memory width).
  A sample's pattern gives ``Q = sum_X S_X^T m_X`` (``d x W``, ``S_X`` its present or missing
  signal prompt), and ``P_t Q`` (``l`` tokens of width ``W``) is appended at the end of branch
  ``t``'s memory input, whose last position the backbone reads out. Tying ``Q`` to the signal
  prompts keeps the count linear in M instead of one prompt per pattern (``2^M - 1``).

``prompts`` selects any subset (the paper's Table 3 ablation); each proper subset is also
registered as ``mplmm_<letters>`` (``g`` generative, ``s`` signal, ``t`` type; ``mplmm_none``:
no prompts, only the re-initialised input projections and output layer), so one study can run
the whole ablation.

``prompt_init`` (every prompt and ``m_X``): ``normal`` (default: truncated normal, std
:data:`NORMAL_STD`, the prompt-tuning convention), ``uniform`` (``U[0, 1)``, the first release)
or ``zeros`` (the released code's last commit).

- ``zeros``: the type path is a product of two zero factors (``P_t`` and ``m_X``): each one's
  gradient is proportional to the other, so both stay exactly zero and the missing-type prompts
  never train (the appended tokens stay zero vectors); there only to reproduce the released code.
  It reproduces the code only together with the code's position rule, ``model.position_padding:
  true``: the code gives an all-zero step (first channel exactly 0) the zero position vector, so
  the appended zero tokens, among them the read-out last position, get no position there, where
  ours would number them. ``zeros`` without that key is refused (config check, and ``apply``).
- ``uniform``: every entry of ``P_t Q`` is a sum of ``d sum_X T_X`` positive products, about
  ``d sum_X T_X / 8`` (about 560 for aligned MOSI, against unit-scale crossmodal outputs), so the
  appended tokens, and with them the read-out last position, swamp the input: predictions hardly
  depend on the sample (measured on synth: prediction std 0.02 against a label std 1.4 after
  training, the same MAE in every test case). That release never ran at the paper's batch size
  (its prompt concatenation only fits when the batch equals ``l``), so no reported number used it.
- ``normal``: non-zero, so the type path trains (unlike ``zeros``), and small, so the readout
  still reads the input (unlike ``uniform``). Adam's steps do not depend on the gradient's scale,
  so the small start does not slow it.

Vectorised over the batch: samples are grouped by pattern (at most ``2^M - 1`` groups, a loop
over patterns, never over samples); the type prompts need no grouping (``S_X^T m_X`` is
precomputed for both states of each modality). A missing modality's raw features are never read
(they are replaced by zeros before anything touches them; the generated sequence replaces the
projection). Padding: a generated sequence is full length.

Trainable parameters (``param_count``), with ``D_X`` raw widths, ``T_X`` lengths, ``K`` outputs,
``W = (M-1) d``, ``A`` ranging over the non-empty subsets of the modalities other than X::

    reinitialised  sum_X D_X d  (input projections, no bias)  +  (M W + 1) K  (output layer)
    generative     M l d + sum_X sum_{Y != X} (D_Y d + d) + sum_X sum_A ((l + sum_{Y in A} T_Y) T_X + T_X)
    signal         2 d sum_X T_X       (also present, and trained only through Q, with type alone)
    type           M l d + W sum_X T_X

(``M (2^(M-1) - 1)`` time maps: 9 for M = 3.) Aligned MOSI (D = 300, 5, 20; T = 50; d = 30;
l = 16; K = 1) gives 88,141, the released code's count.
"""

from __future__ import annotations

import itertools
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.incomplete import substitute
from mmrepro.methods.params import OneOf, PositiveInt
from mmrepro.methods.registry import TRANSFORMS
from mmrepro.methods.transforms import ModelTransform
from mmrepro.models.multimodal import ModelOutput

FAMILIES = ("generative", "signal", "type")
INITS = ("normal", "uniform", "zeros")
GENERATOR_INPUTS = ("dropped", "raw")
Init = Annotated[str, OneOf(INITS)]
GeneratorInput = Annotated[str, OneOf(GENERATOR_INPUTS)]
ZEROS_NEED = ("prompt_init 'zeros' reproduces the released code only under its position rule (the appended zero "
              "tokens get no position there); set model.position_padding: true or choose prompt_init 'normal'")
NORMAL_STD = 0.02
"""``prompt_init: normal``: truncated normal of this std, the prompt-tuning convention (MPMM's prompts here)."""


def _subsets(items: list[int]) -> list[tuple[int, ...]]:
    """Non-empty subsets of ``items``, in a fixed order."""
    return [c for k in range(1, len(items) + 1) for c in itertools.combinations(items, k)]


def mplmm_param_count(dims: list[int], lengths: list[int], d: int, l: int, out_dim: int,
                      prompts: tuple[str, ...] = FAMILIES) -> int:
    """The module docstring's formula: trainable parameters of MPLMM for any number of modalities."""
    m, w = len(dims), (len(dims) - 1) * d
    total = sum(dims) * d + (m * w + 1) * out_dim
    if "generative" in prompts:
        total += m * l * d
        for x in range(m):
            others = [y for y in range(m) if y != x]
            total += sum(dims[y] * d + d for y in others)
            total += sum((l + sum(lengths[y] for y in a)) * lengths[x] + lengths[x] for a in _subsets(others))
    if "signal" in prompts or "type" in prompts:  # the type path is built on the signal prompts
        total += 2 * d * sum(lengths)
    if "type" in prompts:
        total += m * l * d + w * sum(lengths)
    return total


class Prompts(nn.Module):
    """MPLMM's prompt families and generator for modalities of raw widths ``dims`` and lengths ``lengths``."""

    def __init__(self, dims: list[int], lengths: list[int], d: int, l: int, prompts: tuple[str, ...], init: str):
        super().__init__()
        m, w = len(dims), (len(dims) - 1) * d
        self.families, self.lengths = prompts, lengths
        fill = {"normal": lambda t: nn.init.trunc_normal_(t, std=NORMAL_STD), "uniform": nn.init.uniform_,
                "zeros": nn.init.zeros_}[init]
        new = lambda *shape: nn.Parameter(fill(torch.empty(*shape)))  # noqa: E731
        if "generative" in prompts:
            self.gen_prompt = nn.ParameterList(new(l, d) for _ in range(m))
            self.pair = nn.ModuleDict({f"{y}->{x}": nn.Linear(dims[y], d) for x in range(m) for y in range(m) if y != x})
            self.time_map = nn.ModuleDict({
                self._key(x, a): nn.Linear(l + sum(lengths[y] for y in a), lengths[x])
                for x in range(m) for a in _subsets([y for y in range(m) if y != x])})
        if "signal" in prompts or "type" in prompts:
            # (2, T_X, d): index 0 = missing, 1 = present; the type path reads them even without "signal"
            self.signal = nn.ParameterList(new(2, t, d) for t in lengths)
        if "type" in prompts:
            self.type_prompt = nn.Parameter(fill(torch.empty(m, l, d)))
            self.type_map = nn.ParameterList(new(t, w) for t in lengths)

    @staticmethod
    def _key(x: int, available: tuple[int, ...]) -> str:
        return f"{x}<-{'_'.join(map(str, available))}"

    def generate(self, x: int, available: tuple[int, ...], raw: list[torch.Tensor]) -> torch.Tensor:
        """Modality ``x`` (``(n, T_x, d)``) from the raw inputs ``raw[y]`` of the ``available`` ones."""
        n = raw[available[0]].shape[0]
        parts = [self.gen_prompt[x].expand(n, -1, -1)]
        parts += [F.gelu(self.pair[f"{y}->{x}"](raw[y])) for y in available]
        joined = torch.cat(parts, dim=1)  # (n, l + sum T_y, d)
        return F.gelu(self.time_map[self._key(x, available)](joined.transpose(1, 2))).transpose(1, 2)


class MPLMMModel(nn.Module):
    """A frozen ``mplmm_mult`` backbone run with MPLMM's prompts (see the module docstring)."""

    def __init__(self, backbone: nn.Module, prompts: Prompts, generator_input: str = "dropped"):
        super().__init__()
        self.backbone, self.prompts, self.generator_input = backbone, prompts, generator_input
        self.names, self.task_type = backbone.names, backbone.task_type

    def forward(self, batch: Batch) -> ModelOutput:
        present = batch.present
        batch = substitute(batch, present)  # missing raw inputs become zeros: never read
        dropped = self.backbone.drop_inputs(batch)  # one dropout draw, read by projections (and generators)
        projected, pads = self.backbone.project(dropped, dropped=True)
        p, names = self.prompts, self.names
        if "generative" in p.families:
            raw = [(dropped if self.generator_input == "dropped" else batch).x[m] for m in names]
            codes = (present.long() << torch.arange(len(names), device=present.device)).sum(1)
            projected, pads = dict(projected), dict(pads)
            for code in torch.unique(codes).tolist():  # one group per missing pattern, never per sample
                keep = [i for i in range(len(names)) if code >> i & 1]
                if len(keep) == len(names):
                    continue
                rows = (codes == code).nonzero().squeeze(1)
                sub = [r.index_select(0, rows) for r in raw]
                for x in (i for i in range(len(names)) if i not in keep):
                    m = names[x]
                    projected[m] = projected[m].index_copy(0, rows, p.generate(x, tuple(keep), sub).to(projected[m].dtype))
                    pads[m] = pads[m].index_fill(0, rows, False)
        if "signal" in p.families:
            projected = {m: projected[m] + p.signal[i][present[:, i].long()] for i, m in enumerate(names)}
        suffix = None
        if "type" in p.families:
            # Q = sum_X S_X^T m_X for each sample: (B, d, W), from the two precomputed states per modality
            q = sum(torch.einsum("std,tw->sdw", p.signal[i], p.type_map[i])[present[:, i].long()]
                    for i in range(len(names)))
            suffix = {m: torch.einsum("ld,bdw->blw", p.type_prompt[i], q) for i, m in enumerate(names)}
        return self.backbone.forward_from_projected(projected, pads, memory_suffix=suffix)


@TRANSFORMS.register("mplmm")
class MPLMM(ModelTransform):
    """Freeze an ``mplmm_mult`` backbone, re-initialise its input projections and output layer, add prompts."""

    def __init__(self, prompts: list[Annotated[str, OneOf(FAMILIES)]] = FAMILIES, prompt_length: PositiveInt = 16,
                 prompt_init: Init = "normal", generator_input: GeneratorInput = "dropped"):
        self.prompts = tuple(f for f in FAMILIES if f in prompts)
        self.prompt_length, self.prompt_init, self.generator_input = prompt_length, prompt_init, generator_input
        self.requires_model = {"position_padding": (True, ZEROS_NEED)} if prompt_init == "zeros" else {}

    @staticmethod
    def _sizes(model: nn.Module) -> tuple[list[int], list[int], int]:
        if not hasattr(model, "forward_from_projected"):
            raise ValueError("mplmm needs the 'mplmm_mult' backbone (model.backbone: mplmm_mult)")
        dims = [model.encoders[m].proj.in_channels for m in model.names]
        return dims, [model.max_lengths[m] for m in model.names], model.encoders[model.names[0]].proj.out_channels

    def param_count(self, model: nn.Module) -> int:
        dims, lengths, d = self._sizes(model)
        return mplmm_param_count(dims, lengths, d, self.prompt_length, model.head.out.out_features, self.prompts)

    def apply(self, model: nn.Module) -> nn.Module:
        dims, lengths, d = self._sizes(model)
        if self.requires_model and not model.fusion.position_padding:
            raise ValueError(f"model.position_padding must be true for mplmm: {ZEROS_NEED}")
        freeze_for_transfer(model)
        prompts = Prompts(dims, lengths, d, self.prompt_length, self.prompts, self.prompt_init)
        return MPLMMModel(model, prompts, self.generator_input)


def freeze_for_transfer(model: nn.Module) -> None:
    """MPLMM's stage 2 on a MulT: everything frozen but the input projections and the output layer,
    which are re-initialised (dataset-specific: new input widths and outputs in the paper)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in [*(model.encoders[m].proj for m in model.names), model.head.out]:
        layer.reset_parameters()
        for p in layer.parameters():
            p.requires_grad_(True)


def _ablation(letters: str) -> type[MPLMM]:
    """``mplmm_<letters>``: MPLMM with only the families whose initials are ``letters``."""
    chosen = [f for f in FAMILIES if f[0] in letters]

    class Ablation(MPLMM):
        def __init__(self, prompt_length: PositiveInt = 16, prompt_init: Init = "normal",
                     generator_input: GeneratorInput = "dropped"):
            super().__init__(chosen, prompt_length, prompt_init, generator_input)

    Ablation.__doc__ = f"MPLMM with prompts {chosen or 'none'} only (Table 3 ablation)."
    Ablation.__qualname__ = Ablation.__name__ = f"MPLMM_{letters}"
    return TRANSFORMS.register(f"mplmm_{letters}")(Ablation)


ABLATIONS = {letters: _ablation(letters) for letters in ("g", "s", "t", "gs", "gt", "st", "none")}
