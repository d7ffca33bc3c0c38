"""Wander: a low-rank sequence multimodal adapter on a frozen backbone (Guo et al., AAAI 2025).

Sources read
------------
- The paper, arXiv 2412.08979 ("A Wander Through the Multimodal Landscape: Efficient Transfer
  Learning via Low-rank Sequence Multimodal Adapter"): only its abstract and introduction were
  reachable in the stored copies; the method section's equations were not.
- The official repository's README (zrguo/Wander, read through a mirror page): the adapter lives in
  ``models/adapter.py``; run scripts take ``rank``, ``drank`` and ``trank``; the adapter goes on the
  last transformer layer before the prediction head (used in their experiments) or after every
  intermediate transformer layer. ``models/adapter.py`` itself is not in the stored index.
- ``shinnew9/WANDER``, a hand copy of the official code with typos (``models/adapter.py``,
  ``models/model.py``, ``models/foodmodel.py``, ``run/mosi_run.py``), read to understand the shapes;
  nothing is copied from it.

The method, in our words
------------------------
Each of the M modalities gives a token sequence ``X_m`` (T_m x d_m) from the frozen backbone.

1. Down-projection: every token goes to a small width r through a per-modality linear map and a
   GELU, ``Z_m = gelu(X_m A_m + a_m)`` (T_m x r). Padded tokens are set to zero here, so they take
   no part in what follows. Optionally (``append_one``, as TFN/LMF do) a constant 1 is appended to
   each real token, ``Z_m -> [Z_m, 1]`` (width r' = r + 1), which keeps all lower-order (unimodal,
   bimodal, ...) terms inside the product.
2. Sequence fusion by an outer product. Written out in full, the fusion is a linear map of the
   outer product of the M projected *sequences* (a tensor with modes (T_1, r', ..., T_M, r')) to an
   output sequence of a common length L and width h, so every element of every token of one
   modality interacts multiplicatively with every element of every token of the others. Its weight
   tensor would have ``prod_m (T_m r') * L * h`` entries; it is never built. Instead it is
   factorised as (separable over tokens and features, each part CP-decomposed)::

       W[(t_1,i_1),...,(t_M,i_M), l, e] = sum_{j<trank} sum_{k<drank} prod_m S_m^j[t_m, l] D_m^k[i_m, e]

   with token factors ``S_m^j`` (T_m x L, the "trank" low rank over the sequence dimension, which
   maps each modality's sequence to the common length L) and feature factors ``D_m^k`` (r' x h, the
   "drank" CP rank over the feature dimension). By multilinearity the contraction becomes, per
   component pair (j, k), a product over modalities of small matrix products::

       fused[l, e] = sum_j sum_k prod_m (S_m^j^T Z_m D_m^k)[l, e]            (L x h)

   i.e. token by token (position l of the common length) the modalities' mapped vectors are fused
   by a CP-factorised outer product. Cost O(B * trank * L * drank * h * M) time and memory instead of
   exponential in M. ``explicit_outer_product`` computes the same thing by building the outer-product
   tensor and the reconstructed weight tensor, and the tests check the two agree.
3. Residual block. ``placement="last"`` (default; what the official experiments use): the adapter
   reads the backbone's last-layer tokens (our encoders' outputs), mean-pools the L fused positions,
   applies dropout and an up-projection ``U`` (h -> F) and adds the result to the frozen fusion's
   output (B, F), right before the prediction head (on ``casp_early``, whose encoders only project,
   the tokens it reads are the projected inputs). ``placement="every"``: one adapter after every
   encoder transformer layer, run on all modalities' intermediate tokens at once; its fused sequence
   is mapped back to each modality's length by a learned ``P_m`` (T_m x L) and up-projected per
   modality (h -> d_m), and added to that modality's tokens before the next layer.
4. Initialisation: the up-projection(s) start at zero (weight and bias), so the adapted model starts
   exactly as the frozen backbone; all factors start random (the token and back-maps ~N(0, 1/T_m)
   and N(0, 1/L), the feature factors ~N(0, 1/r') scaled by (trank*drank)^(-1/(2M)) so the summed
   product has unit scale). At step 0 only ``U`` gets a gradient; after its first update every factor
   does.

Trainable parameters
--------------------
With d_m the token widths, T_m the maximum lengths, F the fused width, r' = r + append_one,
h = hidden (default r) and L = common_length (default r), one adapter has::

    P = sum_m (d_m r + r)                      # down-projections (with bias)
      + M * drank * r' * h                     # feature CP factors
      + trank * L * sum_m T_m                  # token (sequence) low-rank factors
      + (h F + F)                              # placement "last": up-projection to F (with bias)
      | + sum_m (T_m L + h d_m + d_m)          # placement "every": back-map and up-projection per modality

``placement="every"`` uses one adapter per encoder layer (times the number of layers). With
``train_head`` (default) the prediction head's parameters are trainable too. See
``wander_param_count`` (adapter only) and ``Wander.param_count(model)`` (the whole trainable
budget, head included when trained, as the PEFT baselines' ``param_count``).

Three switches: the paper's reading or the released code's arithmetic
---------------------------------------------------------------------
- ``factor_form``: ``paper`` (default) keeps the sum over components outside the product across
  modalities (the formula above, a true CP decomposition, what the explicit-tensor test checks);
  ``code`` sums each modality's ``trank`` token slices into one T_m x L matrix and its ``drank``
  feature slices into one r' x h matrix *before* the product, as the released code does:
  ``fused = prod_m (sum_j S_m^j)^T Z_m (sum_k D_m^k)``. The code form is the paper form with
  trank = drank = 1 on re-parameterised factors, so it fuses at CP rank one; the parameter count is
  the same (the slices are stored either way).
- ``readout``: ``mean`` (default) averages the L fused positions; ``first_token`` takes position 0,
  the one the code feeds to the prediction head.
- ``residual``: ``pooled`` (default) adds nothing inside the adapter (the frozen fusion's output is
  the residual path); ``first_tokens`` adds, before the readout, the first L positions of the
  modalities' token sequences concatenated along time (padded positions zeroed, zeros appended if
  the concatenation is shorter than L), as the code adds ``x[:, :r]``. It needs h equal to the token
  width (the code's feature factors map r straight to the model width); ``Wander`` sets that when
  ``hidden`` is unset. ``factor_form="code", readout="first_token", residual="first_tokens"`` with
  ``common_length=rank`` computes, before our up-projection, exactly the code's adapter output at
  position 0 (a test checks it against a hand transcription of the code's arithmetic).

Every difference from the released code (two public copies, ``shinnew9/WANDER`` read here)
-------------------------------------------------------------------------------------------
- Factor form: the code sums components before the product (rank one, see above); default here is
  the paper's sum of rank-one components, ``factor_form="code"`` reproduces the code.
- Readout: the code's head reads fused position 0; default here is the mean over positions,
  ``readout="first_token"`` reproduces the code.
- Residual: the code's adapter output *replaces* the sequence its head reads, with the first r
  tokens of the concatenated inputs as its identity path, so the head then sees token 0 of the
  first modality plus the fused term. Our backbone's head reads a pooled fused vector (B, F) from a
  frozen fusion, so the adapter's readout always goes through a zero-initialised up-projection
  ``U`` (h -> F) and is *added* to that vector; ``residual="first_tokens"`` adds the code's identity
  path inside the adapter, before ``U``. There is no setting that drops the frozen fusion's output.
- Width: the code's feature factors map r to the model width; ours map r' to ``hidden`` (default r),
  then ``U`` maps to F (with ``residual="first_tokens"``, hidden = the token width).
- Initialisation: the code starts the token factors at zero (feature factors standard normal),
  which with M >= 2 leaves every adapter parameter without gradient for ever (each factor is
  multiplied by the others' zeros); we start the factors random and ``U`` at zero (LoRA/Houlsby
  style), exact identity at init. The code's initialisation is not offered.
- Padding: the code has no masks; we zero padded tokens after the down-projection (and in the
  ``first_tokens`` residual), so padding never changes the output. (The encoders open position 0 of
  an *empty* sequence in the mask they return; such a position holds a zero token and, through the
  down-projection's bias, adds a small constant term; with ``placement="every"`` the raw padding
  mask is used, so there it is zeroed too.)
- ``append_one`` (a constant 1 appended to each projected token, as TFN/LMF do) and ``dropout`` on the
  read-out vector are ours, off by default; the code has neither.
- Defaults: common length L = r, as in the code where token factors map T_m to ``rank``; r=16,
  drank=8, trank=12 follow the code's MOSI run script.
- Prediction head: the code freezes the pretrained model but keeps its prediction head trainable;
  we do the same by default (``train_head=True``); ``train_head=False`` freezes it.
- ``placement="every"`` is our concrete design of the README's "after every intermediate
  transformer layer" (the README shows only the call pattern); it applies to our per-modality
  encoders, which run layer by layer in lockstep so that the adapter sees all modalities; the
  ``readout`` and ``residual`` switches do not apply there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from mmrepro.methods.params import OneOf, PositiveInt, Rate
from mmrepro.methods.registry import TRANSFORMS
from mmrepro.methods.transforms import ModelTransform
from mmrepro.models.multimodal import MultimodalModel
from mmrepro.models.stages import staged_encoders

PLACEMENTS = ("last", "every")
FACTOR_FORMS = ("paper", "code")
READOUTS = ("mean", "first_token")
RESIDUALS = ("pooled", "first_tokens")


def wander_param_count(dims: Sequence[int], lengths: Sequence[int], out_dim: int | None = None, *, rank: int,
                       drank: int, trank: int, common_length: int | None = None, hidden: int | None = None,
                       append_one: bool = False, placement: str = "last", layers: int = 1) -> int:
    """Trainable parameters of Wander's adapter(s), by the formula in the module docstring.

    ``dims``/``lengths``: per-modality token width and maximum length; ``out_dim``: the fused width F
    (placement ``"last"``); ``layers``: number of encoder layers (placement ``"every"``). The
    prediction head is not included.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    M, L, h = len(dims), common_length or rank, hidden or rank
    rr = rank + int(append_one)
    core = sum(d * rank + rank for d in dims) + M * drank * rr * h + trank * L * sum(lengths)
    if placement == "last":
        if out_dim is None:
            raise ValueError("placement 'last' needs out_dim")
        return core + h * out_dim + out_dim
    return layers * (core + sum(T * L + h * d + d for T, d in zip(lengths, dims)))


def check_switches(factor_form: str, readout: str, residual: str, prefix: str = "") -> None:
    """Each of the three switches names one of its choices (module docstring, "Three switches")."""
    for name, value, allowed in (("factor_form", factor_form, FACTOR_FORMS), ("readout", readout, READOUTS),
                                 ("residual", residual, RESIDUALS)):
        if value not in allowed:
            raise ValueError(f"{prefix}{name} must be one of {allowed}, got {value!r}")


class WanderAdapter(nn.Module):
    """Low-rank sequence multimodal adapter over M token sequences (see the module docstring).

    ``forward(tokens, pads)`` takes lists (one per modality, in order) of ``(B, T_m, d_m)`` tokens
    and ``(B, T_m)`` boolean masks (True = padded; ``T_m`` may be shorter than the maximum length)
    and returns ``(B, out_dim)`` (``output="pooled"``) or a list of per-modality ``(B, T_m, d_m)``
    residuals (``output="tokens"``). Both are exactly zero at initialisation.

    ``factor_form``, ``readout`` and ``residual`` choose between the paper's reading and the
    released code's arithmetic (module docstring, "Three switches"); ``readout`` and ``residual``
    apply to ``output="pooled"`` only, ``residual="first_tokens"`` needs ``hidden`` equal to the
    (common) token width.
    """

    def __init__(self, dims: Sequence[int], lengths: Sequence[int], out_dim: int | None = None, *, rank: int = 16,
                 drank: int = 8, trank: int = 12, common_length: int | None = None, hidden: int | None = None,
                 dropout: float = 0.0, append_one: bool = False, output: str = "pooled",
                 factor_form: str = "paper", readout: str = "mean", residual: str = "pooled"):
        super().__init__()
        check_switches(factor_form, readout, residual)
        if output == "tokens" and (readout, residual) != ("mean", "pooled"):
            raise ValueError("readout and residual apply to output 'pooled' only (placement 'last')")
        if residual == "first_tokens" and any(d != (hidden or rank) for d in dims):
            raise ValueError(f"residual 'first_tokens' adds the input tokens to the fused sequence, so hidden "
                             f"({hidden or rank}) must equal every token width, got {list(dims)}")
        if len(dims) != len(lengths) or not dims:
            raise ValueError(f"need one width and one length per modality, got {list(dims)} and {list(lengths)}")
        if output not in ("pooled", "tokens"):
            raise ValueError(f"output must be 'pooled' or 'tokens', got {output!r}")
        if output == "pooled" and out_dim is None:
            raise ValueError("output 'pooled' needs out_dim")
        for name, v in (("rank", rank), ("drank", drank), ("trank", trank), ("common_length", common_length or rank),
                        ("hidden", hidden or rank)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.dims, self.lengths = [int(d) for d in dims], [int(t) for t in lengths]
        self.rank, self.drank, self.trank = int(rank), int(drank), int(trank)
        self.common_length, self.hidden = int(common_length or rank), int(hidden or rank)
        self.append_one, self.output, self.out_dim = bool(append_one), output, out_dim
        self.factor_form, self.readout_mode, self.residual = factor_form, readout, residual
        self.width = self.rank + int(self.append_one)  # r'
        L, h = self.common_length, self.hidden
        self.down = nn.ModuleList(nn.Linear(d, self.rank) for d in self.dims)
        self.feature_factors = nn.ParameterList(nn.Parameter(torch.empty(self.drank, self.width, h)) for _ in self.dims)
        self.token_factors = nn.ParameterList(nn.Parameter(torch.empty(self.trank, T, L)) for T in self.lengths)
        self.drop = nn.Dropout(dropout)
        if output == "pooled":
            self.up = nn.Linear(h, int(out_dim))
        else:
            self.back = nn.ParameterList(nn.Parameter(torch.empty(T, L)) for T in self.lengths)
            self.up_tokens = nn.ModuleList(nn.Linear(h, d) for d in self.dims)
        self.reset_parameters()

    @property
    def num_modalities(self) -> int:
        return len(self.dims)

    def reset_parameters(self, zero_output: bool = True) -> None:
        """Factor init as in the module docstring; ``zero_output=False`` randomises the up-projection too."""
        M = self.num_modalities
        for lin in self.down:
            lin.reset_parameters()
        scale = (self.trank * self.drank) ** (-1.0 / (2 * M)) / math.sqrt(self.width)
        for p in self.feature_factors:
            nn.init.normal_(p, std=scale)
        for p, T in zip(self.token_factors, self.lengths):
            nn.init.normal_(p, std=1.0 / math.sqrt(T))
        ups = [self.up] if self.output == "pooled" else list(self.up_tokens)
        if self.output == "tokens":
            for p in self.back:
                nn.init.normal_(p, std=1.0 / math.sqrt(self.common_length))
        for lin in ups:
            if zero_output:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
            else:
                lin.reset_parameters()

    # -- the three stages ------------------------------------------------------------------------

    def project(self, tokens: Sequence[torch.Tensor], pads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Down-projected tokens ``(B, T_m, r')`` per modality, zero at padded positions."""
        if len(tokens) != self.num_modalities or len(pads) != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} modalities, got {len(tokens)} token and "
                             f"{len(pads)} mask tensors")
        out = []
        for m, (x, pad) in enumerate(zip(tokens, pads)):
            if x.shape[1] > self.lengths[m]:
                raise ValueError(f"modality {m}: {x.shape[1]} tokens, more than the adapter's {self.lengths[m]}")
            z = F.gelu(self.down[m](x))
            if self.append_one:
                z = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1)
            out.append(z.masked_fill(pad.unsqueeze(-1), 0.0))
        return out

    def fuse(self, projected: Sequence[torch.Tensor]) -> torch.Tensor:
        """Low-rank sequence fusion ``(B, L, h)`` of the projected sequences, never building the tensor."""
        if self.factor_form == "code":  # components summed per modality first: one (T, L) and one (r', h) matrix
            prod = None
            for m, z in enumerate(projected):
                s = self.token_factors[m][:, : z.shape[1]].sum(0)
                v = torch.matmul(torch.matmul(s.transpose(0, 1), z), self.feature_factors[m].sum(0))  # (B, L, h)
                prod = v if prod is None else prod * v
            return prod
        J, K, h = self.trank, self.drank, self.hidden
        prod = None
        for m, z in enumerate(projected):
            s = self.token_factors[m][:, : z.shape[1]]  # (J, T, L)
            y = torch.matmul(s.transpose(1, 2).unsqueeze(0), z.unsqueeze(1))  # (B, J, L, r'): sequence -> length L
            d = self.feature_factors[m].permute(1, 0, 2).reshape(self.width, K * h)  # (r', K h)
            v = torch.matmul(y, d)  # (B, J, L, K h): every (j, k) component at once
            prod = v if prod is None else prod * v
        B, L = prod.shape[0], prod.shape[2]
        return prod.view(B, J, L, K, h).sum(dim=(1, 3))

    def readout(self, fused: torch.Tensor, pads: Sequence[torch.Tensor], tokens: Sequence[torch.Tensor] = ()):
        """Residual output from the fused ``(B, L, h)`` sequence (pooled vector, or per-modality tokens).

        ``tokens`` (the adapter's inputs) are read only by ``residual="first_tokens"``.
        """
        if self.output == "pooled":
            if self.residual == "first_tokens":
                fused = fused + first_tokens(tokens, pads, fused.shape[1])
            vec = fused.mean(dim=1) if self.readout_mode == "mean" else fused[:, 0]
            return self.up(self.drop(vec))
        out = []
        for m, pad in enumerate(pads):
            seq = torch.matmul(self.back[m][: pad.shape[1]], fused)  # (B, T_m, h)
            out.append(self.up_tokens[m](self.drop(seq)).masked_fill(pad.unsqueeze(-1), 0.0))
        return out

    def forward(self, tokens: Sequence[torch.Tensor], pads: Sequence[torch.Tensor]):
        return self.readout(self.fuse(self.project(tokens, pads)), pads, tokens)


def first_tokens(tokens: Sequence[torch.Tensor], pads: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """The first ``length`` positions of the modalities' token sequences concatenated along time
    (padded positions zeroed; zeros appended if the concatenation is shorter): the released code's
    residual."""
    seq = torch.cat([x.masked_fill(p.unsqueeze(-1), 0.0) for x, p in zip(tokens, pads)], dim=1)[:, :length]
    return F.pad(seq, (0, 0, 0, length - seq.shape[1]))


# -- the reference: build the outer product and the weight tensor --------------------------------


def _kron_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Outer product over the row index, Hadamard over the column index: ``(p, c), (q, c) -> (p q, c)``."""
    return (a.unsqueeze(1) * b.unsqueeze(0)).reshape(a.shape[0] * b.shape[0], a.shape[1])


def feature_weight_tensor(adapter: WanderAdapter) -> torch.Tensor:
    """The CP-reconstructed feature weight tensor, flattened to ``(r'^M, h)``: sum_k (x)_m D_m^k."""
    total = None
    for k in range(adapter.drank):
        w = adapter.feature_factors[0][k]
        for m in range(1, adapter.num_modalities):
            w = _kron_rows(w, adapter.feature_factors[m][k])
        total = w if total is None else total + w
    return total


def full_weight_tensor(adapter: WanderAdapter, lengths: Sequence[int]) -> torch.Tensor:
    """The whole reconstructed weight tensor, flattened to ``(prod_m T_m r', L h)``."""
    total = None
    for j in range(adapter.trank):
        for k in range(adapter.drank):
            w = None
            for m, T in enumerate(lengths):
                s, d = adapter.token_factors[m][j, :T], adapter.feature_factors[m][k]  # (T, L), (r', h)
                g = (s[:, None, :, None] * d[None, :, None, :]).reshape(T * adapter.width, -1)  # (T r', L h)
                w = g if w is None else _kron_rows(w, g)
            total = w if total is None else total + w
    return total


def explicit_outer_product(adapter: WanderAdapter, tokens: Sequence[torch.Tensor], pads: Sequence[torch.Tensor], *,
                           full_sequence: bool = False):
    """The adapter's output computed the slow way, by materialising the outer product (reference).

    ``full_sequence=False``: for each token rank j, map each modality to the common length with its
    token factor, build at every common position the outer product of the M projected vectors
    (``r'^M`` entries) and contract it with the CP-reconstructed feature weight tensor; sum over j.
    ``full_sequence=True``: build the outer product of the M whole projected sequences
    (``prod_m T_m r'`` entries per sample) and contract it with the full reconstructed weight tensor
    (token and feature factors). Both then go through the same readout as the adapter. Paper form only.
    """
    if adapter.factor_form != "paper":
        raise ValueError("explicit_outer_product builds the paper form's tensor; the code form is its trank = drank = 1 case")
    z = adapter.project(tokens, pads)
    B, L, h = z[0].shape[0], adapter.common_length, adapter.hidden
    if full_sequence:
        x = z[0].reshape(B, -1)
        for zm in z[1:]:
            x = (x.unsqueeze(2) * zm.reshape(B, 1, -1)).reshape(B, -1)  # (B, prod T_m r')
        fused = (x @ full_weight_tensor(adapter, [zm.shape[1] for zm in z])).view(B, L, h)
    else:
        w = feature_weight_tensor(adapter)  # (r'^M, h)
        fused = None
        for j in range(adapter.trank):
            outer = None
            for m, zm in enumerate(z):
                y = adapter.token_factors[m][j, : zm.shape[1]].transpose(0, 1) @ zm  # (B, L, r')
                outer = y if outer is None else (outer.unsqueeze(-1) * y.unsqueeze(-2)).flatten(2)
            part = outer @ w  # (B, L, r'^M) x (r'^M, h)
            fused = part if fused is None else fused + part
    return adapter.readout(fused, pads, tokens)


def explicit_elements(width: int, lengths: Sequence[int], *, batch: int, trank: int, common_length: int,
                      hidden: int, full_sequence: bool = False) -> int:
    """Elements of the big tensors ``explicit_outer_product`` builds: outer product(s) + weight tensor.

    ``width`` is r'; ``lengths`` the sequence lengths used. Per-token mode keeps one ``(B, L, r'^M)``
    outer product per token rank for the backward pass; full-sequence mode one ``(B, prod T_m r')``
    tensor and the ``(prod T_m r', L h)`` weight tensor. Memory is 4 (float32) or 8 bytes per element
    at least, more with intermediate products and gradients.
    """
    M = len(lengths)
    if full_sequence:
        n_in = math.prod(T * width for T in lengths)
        return batch * n_in + n_in * common_length * hidden
    return trank * batch * common_length * width ** M + width ** M * hidden


# -- wiring into the model ------------------------------------------------------------------------


class WanderFusion(nn.Module):
    """The frozen fusion plus Wander's residual: ``fusion(tokens, pads) + adapter(tokens, pads)``."""

    def __init__(self, base: nn.Module, names: Sequence[str], adapter: WanderAdapter):
        super().__init__()
        self.base, self.adapter, self.names = base, adapter, list(names)
        self.out_dim = base.out_dim

    def forward(self, tokens: dict[str, torch.Tensor], pads: dict[str, torch.Tensor]) -> torch.Tensor:
        fused = self.base(tokens, pads)
        return fused + self.adapter([tokens[m] for m in self.names], [pads[m] for m in self.names])


class WanderLayerwiseModel(MultimodalModel):
    """A ``MultimodalModel`` whose encoders run layer by layer in lockstep, with a Wander adapter after
    every layer (``placement="every"``); ``self.wander[i]`` follows layer i. Otherwise unchanged."""

    def encode(self, batch):
        h, pads, keys = {}, {}, {}
        for m in self.names:
            h[m], pads[m], keys[m] = self.encoders[m].embed(batch.x[m], batch.lengths[m])
        for i, adapter in enumerate(self.wander):
            for m in self.names:
                h[m] = self.encoders[m].run_layer(i, h[m], keys[m])
            delta = adapter([h[m] for m in self.names], [pads[m] for m in self.names])
            for m, dm in zip(self.names, delta):
                h[m] = h[m] + dm
        tokens, masks = {}, {}
        for m in self.names:
            tokens[m], masks[m] = self.encoders[m].finish(h[m], pads[m], keys[m])
        return tokens, masks


def _modality_sizes(model: nn.Module, names: Sequence[str], layered: bool) -> tuple[list[int], list[int]]:
    """Token width and maximum length of each modality's encoder (``layered``: encoders must have layers)."""
    encoders = staged_encoders(model, "wander", layered=layered)
    return [encoders[m].width for m in names], [encoders[m].max_len for m in names]


@TRANSFORMS.register("wander")
class Wander(ModelTransform):
    """Freeze the backbone, add Wander (``placement`` "last" or "every"); the head stays trainable
    when ``train_head`` (the official code's choice). Hyperparameters as in ``WanderAdapter``;
    with ``residual="first_tokens"`` an unset ``hidden`` becomes the token width (the code's r -> dim)."""

    def __init__(self, rank: PositiveInt = 16, drank: PositiveInt = 8, trank: PositiveInt = 12,
                 common_length: PositiveInt | None = None, hidden: PositiveInt | None = None, dropout: Rate = 0.0,
                 append_one: bool = False, placement: Annotated[str, OneOf(PLACEMENTS)] = "last",
                 train_head: bool = True, factor_form: str = "paper", readout: str = "mean", residual: str = "pooled"):
        check_switches(factor_form, readout, residual, prefix="wander: ")
        if placement == "every" and (readout, residual) != ("mean", "pooled"):
            raise ValueError("wander: readout and residual apply to placement 'last' only")
        self.factor_form, self.readout, self.residual = factor_form, readout, residual
        self.rank, self.drank, self.trank = int(rank), int(drank), int(trank)
        self.common_length, self.hidden = common_length, hidden
        self.dropout, self.append_one = float(dropout), bool(append_one)
        self.placement, self.train_head = placement, bool(train_head)
        self.needs_modality_layers = placement == "every"

    def _adapter_kwargs(self, dims: Sequence[int]) -> dict:
        hidden = self.hidden
        if hidden is None and self.residual == "first_tokens":
            hidden = dims[0]
        return dict(rank=self.rank, drank=self.drank, trank=self.trank, common_length=self.common_length,
                    hidden=hidden, dropout=self.dropout, append_one=self.append_one, factor_form=self.factor_form,
                    readout=self.readout, residual=self.residual)

    def param_count(self, model: nn.Module) -> int:
        """The trainable budget ``apply`` gives this model: the adapter(s) by the formula, plus the
        prediction head when ``train_head``. The same before and after ``apply``."""
        head = sum(p.numel() for p in model.head.parameters()) if self.train_head else 0
        return self.adapter_param_count(model) + head

    def adapter_param_count(self, model: nn.Module) -> int:
        """Wander's own parameters for this model (``wander_param_count`` on its shapes)."""
        names = list(model.names)
        dims, lengths = _modality_sizes(model, names, layered=self.placement == "every")
        layers = len(model.encoders[names[0]].layers) if self.placement == "every" else 1
        kw = self._adapter_kwargs(dims)
        return wander_param_count(dims, lengths, model.fusion.out_dim, rank=self.rank, drank=self.drank,
                                  trank=self.trank, common_length=self.common_length, hidden=kw["hidden"],
                                  append_one=self.append_one, placement=self.placement, layers=layers)

    def apply(self, model: nn.Module) -> nn.Module:
        names = list(model.names)
        dims, lengths = _modality_sizes(model, names, layered=self.placement == "every")
        ref = next(model.parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        if self.placement == "last":
            adapter = WanderAdapter(dims, lengths, model.fusion.out_dim, output="pooled", **self._adapter_kwargs(dims))
            model.fusion = WanderFusion(model.fusion, names, adapter.to(ref.device, ref.dtype))
            added: nn.Module = adapter
        else:
            if type(model) is not MultimodalModel:
                raise TypeError(f"wander: placement 'every' needs a MultimodalModel, got {type(model).__name__}")
            n_layers = {len(model.encoders[m].layers) for m in names}
            if len(n_layers) != 1:
                raise ValueError(f"wander: placement 'every' needs encoders of equal depth, got {sorted(n_layers)}")
            model.__class__ = WanderLayerwiseModel
            model.wander = nn.ModuleList(
                WanderAdapter(dims, lengths, output="tokens", **self._adapter_kwargs(dims)) for _ in range(n_layers.pop())
            ).to(ref.device, ref.dtype)
            added = model.wander
        for p in added.parameters():
            p.requires_grad_(True)
        if self.train_head:
            for p in model.head.parameters():
                p.requires_grad_(True)
        return model
