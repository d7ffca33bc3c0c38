"""MCTN and MMIN: missing inputs never read, complete samples untouched, missing ones imagined,
and the reconstruction loss teaches the imagination to reproduce a hidden modality."""

from __future__ import annotations

import pytest
import torch
from test_mplmm import PATTERNS3, SCH3, assert_never_reads_missing, backbone, batch

from mmrepro.data.loader import Batch
from mmrepro.methods import TRANSFORMS, build
from mmrepro.methods.incomplete import substitute

METHODS = [("mctn", {}), ("mmin", {"hidden": 16, "blocks": 2})]


@pytest.mark.parametrize("name,params", METHODS)
def test_missing_inputs_are_never_read(name, params):
    assert_never_reads_missing(build(TRANSFORMS, name, params).apply(backbone(SCH3)))


@pytest.mark.parametrize("name,params", METHODS)
def test_only_missing_modalities_are_imagined(name, params):
    """Complete samples get exactly the backbone's prediction; incomplete ones differ from zero-filling."""
    base = backbone(SCH3)
    model = build(TRANSFORMS, name, params).apply(base).eval()
    b = batch(SCH3, PATTERNS3)
    ours, zeros = model(b).pred, base(substitute(b, b.present)).pred
    complete = b.present.all(1)
    assert torch.allclose(ours[complete], zeros[complete], atol=1e-6)
    assert ((ours - zeros).abs() > 1e-6)[~complete].all()


def _shared_latent_batch(n: int, seed: int) -> Batch:
    """Every modality a fixed linear map of one latent per sample: each is reconstructable from any other."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, 3, generator=g)
    maps = torch.Generator().manual_seed(99)
    x = {m.name: (z @ torch.randn(3, m.dim, generator=maps)).expand(n, m.length, m.dim).contiguous()
         for m in SCH3.modalities}
    return Batch(x=x, lengths={m.name: torch.full((n,), m.length) for m in SCH3.modalities},
                 present=torch.ones(n, 3, dtype=torch.bool), y=torch.zeros(n), index=torch.arange(n))


@pytest.mark.parametrize("name,params", METHODS)
def test_the_reconstruction_loss_teaches_the_imagination(name, params):
    """With the backbone frozen (no collapse of the targets), minimising the model's own loss on complete
    data with hidden modalities brings the reconstruction of a hidden modality close to its tokens."""
    torch.manual_seed(0)
    model = build(TRANSFORMS, name, {**params, "rate": 1.0}).apply(backbone(SCH3))
    model.backbone.requires_grad_(False)
    params = list(model.imagination.parameters())
    b = _shared_latent_batch(16, seed=1)
    model.train()
    losses = []
    for _ in range(40):  # sign-gradient steps (scale-free like Adam; an optimizer's first step imports a lot)
        model.zero_grad()
        loss = model(b).aux_loss
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for p in params:
                p -= 0.01 * p.grad.sign()
    assert losses[0] > 0 and sum(losses[-5:]) / 5 < 0.4 * losses[0]


@pytest.mark.parametrize("bad,match", [({"rate": 1.5}, "rate"), ({"weight": -1.0}, "weight")])
def test_bad_parameters_are_named(bad, match):
    for name, _ in METHODS:
        with pytest.raises(ValueError, match=match):
            build(TRANSFORMS, name, bad)
