"""Parameter-efficient fine-tuning baselines of the PEFT study: what a frozen backbone may still learn.

Why: the study compares a multimodal adapter (Wander) with the usual single-stream PEFT methods on
the same frozen, pretrained backbone. Each baseline here is a :class:`ModelTransform` that freezes
every backbone parameter and then adds or unfreezes exactly its own parameters, so the
``trainable_params`` a run reports is the method's budget. Every transform has a
``param_count(model) -> int`` that predicts that budget from the backbone's shapes alone (it gives
the same number on the backbone before and after ``apply``); the formulas are below.

Notation: ``d`` model width, ``M`` modalities, ``L`` layers per modality encoder, ``F`` width of
the head's residual MLP (``M d`` for ``late``/``mult``, ``d`` for the presets), ``K`` outputs (1 for
regression). "Transformer layers" are every layer of the encoders and the fusion
(:func:`mmrepro.models.stages.transformer_blocks`): ``M L`` for ``late`` and ``casp_late``,
``M L + M (M-1) fusion_layers + M`` for ``mult``, ``L`` for ``casp_early``. Each has an attention
(packed ``d -> 3d`` input projection, ``d -> d`` output projection) and a feed-forward
``d -> w d -> d`` (``w = 2`` in the light backbones, 4 in the presets' MulT layers).
``H = 2 (F^2 + F) + F K + K`` is the size of the whole prediction head (its residual MLP and
``out``), plus ``G F + F`` where the head first maps its ``G``-wide input to ``F`` (``casp_late``:
``G = M d``).

What each one adapts:

- ``linear_probe``: only the head's final linear layer ``head.out``. Count: ``F K + K``.
- ``lora`` (Hu et al., 2022): a frozen weight ``W (d_out, d_in)`` becomes ``W + (alpha / r) B A``
  with ``A (r, d_in)`` Kaiming-uniform and ``B (d_out, r)`` zero, so the model starts unchanged.
  ``target`` picks the weights of every transformer layer: ``qkv`` (the packed attention input
  projection), ``attn_out`` (attention output projection), ``ff`` (both feed-forward linears);
  default all three. Count: ``sum over targeted weights of r (d_in + d_out)``; with every target
  that is ``r (4d + 2d + 2 (w + 1) d)`` per transformer layer (``12 r d`` light, ``16 r d`` presets),
  plus ``H`` if ``train_head``.
  ``nn.MultiheadAttention`` never calls its projections as modules: it reads ``in_proj_weight``
  (q, k and v packed as one ``(3d, d)`` tensor) and ``out_proj.weight`` as tensors. Their update
  is therefore a ``torch.nn.utils.parametrize`` parametrization that returns ``W + s B A`` whenever
  the attribute is read (one LoRA on the packed weight, ``B (3d, r)``, as PEFT does for this
  module). Feed-forward linears are called as modules, so they are wrapped (:class:`LoRALinear`)
  and ``dropout`` (PEFT's ``lora_dropout``) acts on the input of their low-rank branch; the
  attention projections are merged weights with no input to drop, so they get none (as in PEFT).
- ``adapter_houlsby`` (Houlsby et al., 2019): a bottleneck ``h + up(act(down(h)))`` (``down d -> b``,
  ``up b -> d`` zero-initialised, so it starts as the identity) on the output of the attention
  sublayer and of the feed-forward sublayer of every transformer layer, after the sublayer's
  dropout and before its residual addition (the placement of the reference BERT code; in the
  presets' MulT layers, whose residual dropout is functional, before that dropout). The
  backbone's LayerNorms stay frozen (the paper also tuned them). Count:
  ``2 (2 d b + d + b)`` per transformer layer, plus ``H`` if ``train_head``.
- ``adapter_pfeiffer`` (Pfeiffer et al., 2021): the same bottleneck after the feed-forward
  sublayer only. Count: ``2 d b + d + b`` per transformer layer, plus ``H`` if ``train_head``.
- ``prompt_tuning`` (Lester et al., 2021; shallow VPT, Jia et al., 2022): ``n`` learned tokens per
  modality are prepended to that encoder's token sequence (after its positions are added, so the
  prompts carry no position) before its transformer, and dropped after it; the key-padding mask
  gets ``n`` open positions in front, so real tokens attend to the prompts and padded positions
  stay masked. The encoders run stage by stage (:class:`mmrepro.models.stages.StagedEncoder`), so
  backbones whose encoders only project (``casp_early``, ``mplmm_mult``) cannot take prompts.
  Count: ``M n d``, plus ``H`` if ``train_head``.

The backbone's modules are wrapped or parametrized in place, found through
:mod:`mmrepro.models.stages` (the one place that knows each backbone's layout).
LoRA, adapters and prompts train the whole prediction head by default (``train_head=True``), as
PEFT classification fine-tuning does (a new task's head is never frozen). PyTorch's fused
encoder-layer kernel (used in evaluation without gradients) reads a layer's weights as tensors and
skips its submodules' ``forward``: LoRA's weights are read through properties that already hold
``W + s B A``, and layers with adapters get a no-op forward pre-hook, which makes PyTorch take the
module-by-module path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from mmrepro.data.loader import Batch
from mmrepro.methods.params import NonNegative, OneOf, Positive, PositiveInt, Rate
from mmrepro.methods.registry import TRANSFORMS
from mmrepro.methods.transforms import ModelTransform
from mmrepro.models.multimodal import MultimodalModel
from mmrepro.models.stages import block_parts, open_keys, staged_encoders, transformer_blocks

# ---------------------------------------------------------------------------------------------
# The backbone's parts these methods reach (mmrepro.models.stages knows every backbone's layout)


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """Every transformer layer of the encoders and the fusion (module order), see the module docstring."""
    return transformer_blocks(model)


def _attention(layer: nn.Module) -> nn.Module:
    mha = block_parts(layer).attention
    if not isinstance(getattr(mha, "in_proj_weight", None), torch.Tensor):
        raise TypeError(f"expected an attention with a packed in_proj_weight, got {type(mha).__name__} "
                        "(was the model transformed before?)")
    if isinstance(mha, nn.MultiheadAttention) and not mha._qkv_same_embed_dim:
        raise ValueError("lora: attention with separate q/k/v weights is not supported")
    return mha


def head_count(model: nn.Module) -> int:
    """``H``: the prediction head, ``2 (F^2 + F) + F K + K`` (residual MLP ``F -> F -> F``, ``out F -> K``),
    plus ``G F + F`` when it first maps its ``G``-wide input to ``F`` (CASP's late-fusion head)."""
    f, k = model.head.out.in_features, model.head.out.out_features
    pre = getattr(model.head, "pre", None)
    return 2 * (f * f + f) + f * k + k + (pre[0].in_features * f + f if pre is not None else 0)


def _freeze(model: nn.Module) -> None:
    model.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Linear probing


@TRANSFORMS.register("linear_probe")
class LinearProbe(ModelTransform):
    """Only ``head.out`` trains. ``param_count = F K + K``."""

    def param_count(self, model: nn.Module) -> int:
        f, k = model.head.out.in_features, model.head.out.out_features
        return f * k + k

    def apply(self, model: nn.Module) -> nn.Module:
        _freeze(model)
        model.head.out.requires_grad_(True)
        return model


# ---------------------------------------------------------------------------------------------
# LoRA


class LoRAUpdate(nn.Module):
    """The low-rank update ``(alpha / r) B A`` of one ``(d_out, d_in)`` weight; ``B`` starts at zero."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, like: torch.Tensor):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=like.device, dtype=like.dtype))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=like.device, dtype=like.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default, as LoRA's reference code
        self.scaling = alpha / r

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling


class LoRAWeight(LoRAUpdate):
    """Parametrization ``W -> W + (alpha / r) B A`` for weights read as tensors (attention projections)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta()


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank branch with input dropout: ``base(x) + s B A drop(x)``.

    ``weight``/``bias`` give the merged ``W + s B A`` and the base bias, for code that reads a
    linear layer's tensors instead of calling it (PyTorch's fused encoder-layer kernel); that code
    runs only in evaluation, where the dropout is the identity, so both routes agree.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora = LoRAUpdate(base.in_features, base.out_features, r, alpha, base.weight)
        self.dropout = nn.Dropout(dropout)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight + self.lora.delta()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(self.dropout(x), self.lora.lora_A), self.lora.lora_B)
        return self.base(x) + low * self.lora.scaling


LORA_TARGETS = ("qkv", "attn_out", "ff")


@TRANSFORMS.register("lora")
class LoRA(ModelTransform):
    """Low-rank updates of the targeted weights of every transformer layer (see the module docstring).

    ``param_count = sum over targeted weights W (d_out, d_in) of r (d_in + d_out)`` (+ ``H`` if
    ``train_head``); per transformer layer of width ``d``: ``qkv`` ``4 r d``, ``attn_out`` ``2 r d``,
    ``ff`` ``6 r d``, all three ``12 r d``.
    """

    def __init__(self, r: PositiveInt = 8, alpha: Positive = 16.0, dropout: Rate = 0.0,
                 target: Sequence[str] = LORA_TARGETS, train_head: bool = True):
        target = [target] if isinstance(target, str) else list(target)
        unknown = sorted(set(target) - set(LORA_TARGETS))
        if not target or unknown:
            raise ValueError(f"lora: target must be a non-empty subset of {list(LORA_TARGETS)}, got {target!r}")
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.target, self.train_head = tuple(t for t in LORA_TARGETS if t in target), bool(train_head)

    def _weights(self, layer: nn.Module) -> Iterable[tuple[int, int]]:
        """``(d_in, d_out)`` of each targeted weight of one layer."""
        parts = block_parts(layer)
        d = parts.width
        if "qkv" in self.target:
            yield d, 3 * d
        if "attn_out" in self.target:
            yield d, d
        if "ff" in self.target:
            for parent, name in parts.feed_forward:
                lin = getattr(parent, name)
                yield lin.in_features, lin.out_features

    def param_count(self, model: nn.Module) -> int:
        n = sum(self.r * (d_in + d_out) for layer in transformer_layers(model) for d_in, d_out in self._weights(layer))
        return n + (head_count(model) if self.train_head else 0)

    def apply(self, model: nn.Module) -> nn.Module:
        _freeze(model)
        for layer in transformer_layers(model):
            mha = _attention(layer)
            if "qkv" in self.target:
                self._parametrize(mha, "in_proj_weight")
            if "attn_out" in self.target:
                self._parametrize(mha.out_proj, "weight")
            if "ff" in self.target:
                for parent, name in block_parts(layer).feed_forward:
                    lin = getattr(parent, name)
                    if not isinstance(lin, nn.Linear):
                        raise ValueError(f"lora: {name} is already a {type(lin).__name__}")
                    setattr(parent, name, LoRALinear(lin, self.r, self.alpha, self.dropout))
        if self.train_head:
            model.head.requires_grad_(True)
        return model

    def _parametrize(self, module: nn.Module, name: str) -> None:
        if parametrize.is_parametrized(module, name):
            raise ValueError(f"lora: {type(module).__name__}.{name} is already parametrized")
        w = getattr(module, name)
        parametrize.register_parametrization(module, name, LoRAWeight(w.shape[1], w.shape[0], self.r, self.alpha, w))


# ---------------------------------------------------------------------------------------------
# Bottleneck adapters


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))`` with ``up`` zero-initialised: the identity at the start."""

    def __init__(self, d: int, bottleneck: int, activation: str, like: torch.Tensor):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.down = nn.Linear(d, bottleneck, **kw)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, d, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class AdaptedOutput(nn.Module):
    """A sublayer module followed by an adapter on its output (the first element of a tuple output)."""

    def __init__(self, module: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.module, self.adapter = module, adapter

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


def _eager_forward(module: nn.Module, args: tuple) -> None:
    """No-op pre-hook: a layer with a hook never takes PyTorch's fused kernel, which would skip the adapters."""
    return None


class _BottleneckAdapters(ModelTransform):
    sublayers: tuple[str, ...] = ()

    def __init__(self, bottleneck: PositiveInt = 16, activation: Annotated[str, OneOf(ACTIVATIONS)] = "relu",
                 train_head: bool = True):
        self.bottleneck, self.activation, self.train_head = int(bottleneck), activation, bool(train_head)

    def param_count(self, model: nn.Module) -> int:
        b = self.bottleneck
        n = sum(len(self.sublayers) * (2 * d * b + d + b) for d in (block_parts(layer).width
                                                                     for layer in transformer_layers(model)))
        return n + (head_count(model) if self.train_head else 0)

    def apply(self, model: nn.Module) -> nn.Module:
        _freeze(model)
        for layer in transformer_layers(model):
            parts, like = block_parts(layer), next(layer.parameters())
            sites = {"attention": parts.attention_output, "ff": parts.ff_output}
            for sublayer in self.sublayers:
                parent, attr = sites[sublayer]
                module = getattr(parent, attr)
                if isinstance(module, AdaptedOutput):
                    raise ValueError(f"{self.name}: {attr} already has an adapter")
                adapter = BottleneckAdapter(parts.width, self.bottleneck, self.activation, like)
                setattr(parent, attr, AdaptedOutput(module, adapter))
            if isinstance(layer, nn.TransformerEncoderLayer):
                layer.register_forward_pre_hook(_eager_forward)
        if self.train_head:
            model.head.requires_grad_(True)
        return model


@TRANSFORMS.register("adapter_houlsby")
class HoulsbyAdapters(_BottleneckAdapters):
    """Adapters after the attention and the feed-forward sublayer of every transformer layer.

    ``param_count = sum over transformer layers of 2 (2 d b + d + b)`` (+ ``H`` if ``train_head``).
    """

    sublayers = ("attention", "ff")


@TRANSFORMS.register("adapter_pfeiffer")
class PfeifferAdapters(_BottleneckAdapters):
    """An adapter after the feed-forward sublayer of every transformer layer.

    ``param_count = sum over transformer layers of (2 d b + d + b)`` (+ ``H`` if ``train_head``).
    """

    sublayers = ("ff",)


# ---------------------------------------------------------------------------------------------
# Prompt tuning


class PromptedModel(MultimodalModel):
    """A ``MultimodalModel`` whose encoders run in stages with ``self.prompts[m]`` in front of their
    embedded tokens, dropped after the last layer (set by :meth:`PromptTuning.apply`)."""

    def encode(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        tokens, pads = {}, {}
        for m in self.names:
            enc, prompts = self.encoders[m], self.prompts[m]
            h, pad, keys = enc.embed(batch.x[m], batch.lengths[m])
            n = prompts.shape[1]
            h = torch.cat([prompts.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
            wide = open_keys(keys, n, front=True)
            for i in range(len(enc.layers)):
                h = enc.run_layer(i, h, wide)
            tokens[m], pads[m] = enc.finish(h[:, n:], pad, keys)
        return tokens, pads


@TRANSFORMS.register("prompt_tuning")
class PromptTuning(ModelTransform):
    """``n_prompts`` learned tokens per modality encoder (see the module docstring).

    ``param_count = sum over modality encoders of n_prompts d = M n d`` (+ ``H`` if ``train_head``).
    """

    needs_modality_layers = True

    def __init__(self, n_prompts: PositiveInt = 8, init_std: NonNegative = 0.02, train_head: bool = True):
        self.n_prompts, self.init_std, self.train_head = int(n_prompts), float(init_std), bool(train_head)

    def param_count(self, model: nn.Module) -> int:
        n = sum(self.n_prompts * enc.width for enc in staged_encoders(model, "prompt_tuning").values())
        return n + (head_count(model) if self.train_head else 0)

    def apply(self, model: nn.Module) -> nn.Module:
        encoders = staged_encoders(model, "prompt_tuning")
        if type(model) is not MultimodalModel:
            raise TypeError(f"prompt_tuning: needs a plain MultimodalModel, got {type(model).__name__} "
                            "(was the model transformed before?)")
        like = next(model.parameters())
        _freeze(model)
        model.__class__ = PromptedModel
        model.prompts = nn.ParameterDict({
            m: nn.Parameter(torch.randn(1, self.n_prompts, enc.width, device=like.device, dtype=like.dtype)
                            * self.init_std) for m, enc in encoders.items()})
        if self.train_head:
            model.head.requires_grad_(True)
        return model
