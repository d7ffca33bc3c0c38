"""Optimisers and per-epoch schedules selected by the train config."""

from __future__ import annotations

import math

import pytest
import torch

from mmrepro.optim import EpochSchedule, build_optimizer


def _optimizer(name: str = "sgd", lr: float = 0.01) -> torch.optim.Optimizer:
    return build_optimizer([torch.nn.Parameter(torch.zeros(3))], name, lr=lr, weight_decay=3e-4, momentum=0.9)


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_optimizer_by_name(name, cls):
    opt = _optimizer(name)
    assert type(opt) is cls and opt.param_groups[0]["weight_decay"] == 3e-4
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.9


def _rates(schedule: EpochSchedule, epochs: int, losses=None) -> list[float]:
    rates = []
    for e in range(epochs):
        rates.append(schedule.optimizer.param_groups[0]["lr"])
        schedule.step(losses[e] if losses else 1.0)
    return rates


def test_cosine_warms_up_linearly_then_decays_to_min_lr():
    opt = _optimizer()
    schedule = EpochSchedule(opt, "cosine", lr=0.01, epochs=20, when=10, factor=0.1, warmup_epochs=10,
                             warmup_lr=4e-4, min_lr=1e-3)
    rates = _rates(schedule, 20)
    assert rates[0] == pytest.approx(4e-4)
    assert rates[5] == pytest.approx(4e-4 + (0.01 - 4e-4) * 0.5)
    assert rates[10] == pytest.approx(0.01) and rates[19] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[14] == pytest.approx(1e-3 + 0.5 * (0.01 - 1e-3) * (1 + math.cos(math.pi * 4 / 9)))


def test_plateau_drops_the_rate_after_when_epochs_without_improvement():
    opt = _optimizer("adam", lr=1e-3)
    schedule = EpochSchedule(opt, "plateau", lr=1e-3, epochs=10, when=2, factor=0.1, warmup_epochs=0,
                             warmup_lr=0, min_lr=0)
    rates = _rates(schedule, 6, losses=[1.0, 0.9, 0.95, 0.95, 0.95, 0.95])
    assert rates[:5] == pytest.approx([1e-3] * 5)
    assert rates[5] == pytest.approx(1e-4), "the third epoch without improvement exceeds patience 2"


def test_schedule_state_round_trips_for_resume():
    a = EpochSchedule(_optimizer("adam", 1e-3), "plateau", lr=1e-3, epochs=10, when=1, factor=0.5,
                      warmup_epochs=0, warmup_lr=0, min_lr=0)
    _rates(a, 3, losses=[1.0, 1.0, 1.0])
    b = EpochSchedule(_optimizer("adam", 1e-3), "plateau", lr=1e-3, epochs=10, when=1, factor=0.5,
                      warmup_epochs=0, warmup_lr=0, min_lr=0)
    b.load_state_dict(a.state_dict())
    assert b.epoch == 3 and b.plateau.num_bad_epochs == a.plateau.num_bad_epochs


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown optimizer"):
        _optimizer("lion")
    with pytest.raises(ValueError, match="unknown scheduler"):
        EpochSchedule(_optimizer(), "step", lr=0.1, epochs=1, when=1, factor=0.1, warmup_epochs=0, warmup_lr=0,
                      min_lr=0)
