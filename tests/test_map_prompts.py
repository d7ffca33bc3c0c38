"""MPMM (missing-aware prompts): one prompt per missing pattern on the frozen MulT."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmrepro.methods import TRANSFORMS, build
from mmrepro.methods.map_prompts import map_param_count
from mmrepro.methods.transforms import count_parameters
from test_mplmm import PATTERNS3, SCH3, backbone, batch, schema


@pytest.mark.parametrize("dims,lengths", [([5, 3], [6, 4]), ([5, 3, 4], [6, 4, 5])])
def test_trainable_parameters_follow_the_formula(dims, lengths):
    t = build(TRANSFORMS, "map", {"prompt_length": 3})
    model = backbone(schema(dims, lengths))
    assert t.param_count(model) == map_param_count(dims, 8, 3, 1) == count_parameters(t.apply(model))[0]


def test_each_pattern_has_its_own_prompt_and_missing_inputs_are_never_read():
    model = build(TRANSFORMS, "map").apply(backbone(SCH3)).eval()
    b = batch(SCH3, PATTERNS3)
    before = model(b).pred
    assert torch.isfinite(before).all()
    x = {m: torch.where(b.present[:, i].view(-1, 1, 1), v, torch.randn_like(v)) for i, (m, v) in enumerate(b.x.items())}
    assert torch.equal(model(replace(b, x=x)).pred, before)
    code = 1  # only the first modality present
    with torch.no_grad():
        model.prompts[code - 1].add_(torch.randn_like(model.prompts[code - 1]))  # a constant shift would vanish in LayerNorm
    changed = (model(b).pred - before).abs() > 1e-6
    only_first = torch.tensor([p == [1, 0, 0] for p in PATTERNS3])
    assert changed[only_first].all() and not changed[~only_first].any()
