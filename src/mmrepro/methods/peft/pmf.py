"""PMF, prompt-based multimodal fusion (Li et al., CVPR 2023, "Efficient Multimodal Fusion via
Interactive Prompting"), on the frozen multimodal backbone: learned prompts carry information between
the frozen per-modality encoders in their last layers.

Sources read
------------
- Whether the Wander paper (arXiv 2412.08979) compares against this method could not be checked:
  only its abstract and introduction are in the stored copies; the project's spec names it as one of
  the likely multimodal PEFT baselines.
- The paper's abstract and a review page quoting its Figure 2 caption (two-stream structure, prompts
  disentangled into query prompts, query context prompts and fusion context prompts, prompts only
  in the deep layers so that gradients need not reach the lower layers). The method section itself
  was not in the stored copies.
- The official code, ``yaoweilee/PMF`` (``PMF.py``), read to confirm the mechanism. Nothing is
  copied from it.

What is confirmed (official code: a frozen BERT and a frozen ViT, classification)
--------------------------------------------------------------------------------
- The first ``L - L_f`` layers of both encoders run unimodally ("base feature extraction"); the last
  ``L_f`` (``n_fusion_layers``, default 2) are multimodal fusion layers.
- In fusion layer k, for each direction (text -> image and image -> text), a *query stage*: the
  source encoder's layer k runs on ``[source tokens; query-context prompts; query prompts]``; the
  outputs at the query-prompt positions are mapped by a non-linear translator (Linear, ReLU, Linear;
  hidden width ``max(d_img, d_txt) / 2``) into the target encoder's width.
- Then a *fusion stage*: the target encoder's same layer k runs on ``[target tokens; fusion-context
  prompts; translated query outputs]``, and only the outputs at the target's own token positions
  go on to the next layer. Each frozen layer therefore runs twice per fusion layer.
- Prompts are per fusion layer: query and query-context prompts per direction (in the source's
  width), fusion-context prompts per modality; lengths ``n_qp = n_qcp = n_fcp = 4`` by default;
  prompts start N(0, 0.02), translators with PyTorch's default Linear initialisation. Prompt
  positions are always attended (text padding stays masked).
- Trainable: the prompts, the translators and the two new per-modality classification heads (their
  average is the prediction); both encoders stay frozen. (In the official file the fusion-context
  prompts are left out of the trainable set by a name check that never matches; the paper trains
  all three prompt types, and so do we.)
- PMF does not start as the frozen model: the prompts change the attention from the first step.

Our adaptation to this project's backbones (per-modality transformer encoders + a fusion module)
-----------------------------------------------------------------------------------------------
M modalities instead of two: every ordered pair (s -> t) of modalities is a direction with its own
query and query-context prompts (width d_s) and translator (d_s -> h -> d_t); in fusion layer k each
modality s runs M - 1 query stages (one per target) and each target t one fusion stage whose input
is ``[tokens_t; fusion-context prompts_t; translated queries from all M - 1 sources]``. For M = 2 this
is exactly the official two-direction design. The encoders run layer by layer in lockstep (the
model's ``encode`` is replaced, the frozen modules untouched). The prompt positions get open
entries in the key-padding mask, so padded tokens stay masked and padding values never matter.
After the encoders, the frozen fusion module and the model's own prediction head follow (trained by
default, ``train_head``, as for every PEFT baseline here) in place of PMF's per-modality heads.
``fusion_layers`` defaults to ``min(2, L)``; with one modality PMF reduces to the fusion-context
prompts (no direction exists).

Trainable parameters
--------------------
With K = fusion_layers, d_m the widths, h the translator's hidden width (default
``max_m d_m // 2``), n_qp, n_qcp, n_fcp the prompt lengths::

    P = K * ( sum over ordered pairs s != t of [ (n_qp + n_qcp) d_s + (d_s h + h) + (h d_t + d_t) ]
              + sum_m n_fcp d_m )
      (+ H, the prediction head, if train_head)

``PMF.param_count(model)`` evaluates it on a backbone (the same before and after ``apply``).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from mmrepro.data.loader import Batch
from mmrepro.methods.params import Count, NonNegative, PositiveInt
from mmrepro.methods.peft.baselines import head_count
from mmrepro.methods.registry import TRANSFORMS
from mmrepro.methods.transforms import ModelTransform
from mmrepro.models.multimodal import MultimodalModel
from mmrepro.models.stages import StagedEncoder, open_keys, staged_encoders


def _key(s: str, t: str) -> str:
    return f"{s}->{t}"


class Translator(nn.Module):
    """PMF's non-linear mapping of query outputs from the source width to the target width."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(torch.relu(self.linear1(x)))


class PMFLayer(nn.Module):
    """The prompts and translators of one fusion layer, for modalities ``names`` of widths ``dims``."""

    def __init__(self, names: list[str], dims: list[int], *, n_qp: int, n_qcp: int, n_fcp: int, hidden: int,
                 init_std: float):
        super().__init__()
        width = dict(zip(names, dims))

        def prompts(n: int, d: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(1, n, d) * init_std)

        pairs = [(s, t) for s, t in itertools.permutations(names, 2)]
        self.query = nn.ParameterDict({_key(s, t): prompts(n_qp, width[s]) for s, t in pairs})
        self.query_context = nn.ParameterDict({_key(s, t): prompts(n_qcp, width[s]) for s, t in pairs if n_qcp})
        self.fusion_context = nn.ParameterDict({m: prompts(n_fcp, width[m]) for m in names if n_fcp})
        self.translate = nn.ModuleDict({_key(s, t): Translator(width[s], hidden, width[t]) for s, t in pairs})


def _run(enc: StagedEncoder, i: int, tokens: torch.Tensor, key_pad: torch.Tensor | None,
         extra: list[torch.Tensor]) -> torch.Tensor:
    """Layer ``i`` of a frozen encoder on ``[tokens; *extra]``; the extra positions are attended."""
    b = tokens.shape[0]
    extra = [e.expand(b, -1, -1).to(tokens.dtype) for e in extra]
    n = sum(e.shape[1] for e in extra)
    return enc.run_layer(i, torch.cat([tokens, *extra], dim=1), open_keys(key_pad, n, front=False))


class PMFModel(MultimodalModel):
    """A ``MultimodalModel`` whose encoders run in lockstep with PMF's query and fusion stages in their
    last ``len(self.pmf)`` layers (set by :meth:`PMF.apply`); everything else is unchanged."""

    def encode(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        enc = {m: self.encoders[m] for m in self.names}
        h, pads, keys = {}, {}, {}
        for m in self.names:
            h[m], pads[m], keys[m] = enc[m].embed(batch.x[m], batch.lengths[m])
        first = len(enc[self.names[0]].layers) - len(self.pmf)
        for l in range(first):  # base feature extraction, unimodal
            for m in self.names:
                h[m] = enc[m].run_layer(l, h[m], keys[m])
        for k, p in enumerate(self.pmf):
            queries: dict[str, list[torch.Tensor]] = {t: [] for t in self.names}
            for s, t in itertools.permutations(self.names, 2):  # query stage, one per direction
                key = _key(s, t)
                prompts = ([p.query_context[key]] if key in p.query_context else []) + [p.query[key]]
                out = _run(enc[s], first + k, h[s], keys[s], prompts)[:, -p.query[key].shape[1]:]
                queries[t].append(p.translate[key](out))
            h = {t: _run(enc[t], first + k, h[t], keys[t],  # fusion stage; keep the target's own positions
                         ([p.fusion_context[t]] if t in p.fusion_context else []) + queries[t])[:, : h[t].shape[1]]
                 for t in self.names}
        tokens, masks = {}, {}
        for m in self.names:
            tokens[m], masks[m] = enc[m].finish(h[m], pads[m], keys[m])
        return tokens, masks


@TRANSFORMS.register("pmf")
class PMF(ModelTransform):
    """Freeze the backbone and add PMF's prompts and translators (see the module docstring)."""

    needs_modality_layers = True

    def __init__(self, fusion_layers: PositiveInt | None = None, n_qp: PositiveInt = 4, n_qcp: Count = 4,
                 n_fcp: Count = 4, hidden: PositiveInt | None = None, init_std: NonNegative = 0.02,
                 train_head: bool = True):
        self.fusion_layers = None if fusion_layers is None else int(fusion_layers)
        self.n_qp, self.n_qcp, self.n_fcp = int(n_qp), int(n_qcp), int(n_fcp)
        self.hidden = None if hidden is None else int(hidden)
        self.init_std, self.train_head = float(init_std), bool(train_head)

    def _plan(self, model: nn.Module) -> tuple[int, list[int], int]:
        """``(K, widths, hidden)`` for this backbone; encoders must have one depth."""
        encoders = staged_encoders(model, "pmf")
        depths = {len(encoders[m].layers) for m in model.names}
        if len(depths) != 1:
            raise ValueError(f"pmf: the encoders run in lockstep and need one depth, got {sorted(depths)}")
        depth = depths.pop()
        k = min(2, depth) if self.fusion_layers is None else self.fusion_layers
        if k > depth:
            raise ValueError(f"pmf: fusion_layers={k} but the encoders have {depth} layers")
        dims = [encoders[m].width for m in model.names]
        return k, dims, self.hidden or max(1, max(dims) // 2)

    def param_count(self, model: nn.Module) -> int:
        k, dims, h = self._plan(model)
        pairs = sum((self.n_qp + self.n_qcp) * ds + ds * h + h + h * dt + dt
                    for (ds, dt) in itertools.permutations(dims, 2))
        return k * (pairs + self.n_fcp * sum(dims)) + (head_count(model) if self.train_head else 0)

    def apply(self, model: nn.Module) -> nn.Module:
        k, dims, hidden = self._plan(model)
        if type(model) is not MultimodalModel:
            raise TypeError(f"pmf: needs a plain MultimodalModel, got {type(model).__name__} "
                            "(was the model transformed before?)")
        like = next(model.parameters())
        model.requires_grad_(False)
        model.__class__ = PMFModel
        model.pmf = nn.ModuleList(
            PMFLayer(list(model.names), dims, n_qp=self.n_qp, n_qcp=self.n_qcp, n_fcp=self.n_fcp, hidden=hidden,
                     init_std=self.init_std) for _ in range(k)
        ).to(device=like.device, dtype=like.dtype)
        model.pmf.requires_grad_(True)
        if self.train_head:
            model.head.requires_grad_(True)
        return model
