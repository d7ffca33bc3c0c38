"""Parity with the released code: each method's arithmetic against numbers the official code produced.

``tests/data/parity/`` holds, per method, what the released code computed (its README names the
repositories, commits and settings) when run on weights copied from the models built here from
:data:`SEED`, on the batches built here from :data:`SEED`. Each test rebuilds our side the same
way and compares within the float32 tolerance stated per check in :data:`TOLERANCE`
(``|ours - official| <= atol + rtol * |official|``). Dropout is off on both sides, so train mode is
deterministic; the fixtures hold numbers only (the code that made them stays outside the repository).
A change to a method's arithmetic fails its test (checked once per method by changing one line).

The helpers below are also what produced our side when the fixtures were made, so they are the
one description of the inputs, the models and what is recorded.
"""

from __future__ import annotations

import itertools
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from mmrepro.data.loader import SplitLoader
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.evaluate import model_predictions
from mmrepro.methods import TRANSFORMS, build
from mmrepro.methods import casp as casp_module
from mmrepro.methods.adapters import SplitPool, drop_modality, layer_norm_parameters
from mmrepro.methods.balance.cggm import CGGM
from mmrepro.methods.casp import CASP, nt_xent
from mmrepro.methods.peft.wander import first_tokens
from mmrepro.models import build_model
from mmrepro.train import TrainConfig, fit

DATA = Path(__file__).parent / "data" / "parity"
SEED = 20  # issue 20
NAMES, DIMS, LENGTHS = ("text", "audio", "vision"), (12, 5, 7), (6, 5, 4)
REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
SCHEMA = DatasetSchema(name="parity", modalities=tuple(ModalitySpec(m, length=t, dim=d)
                                                       for m, d, t in zip(NAMES, DIMS, LENGTHS)),
                       tasks=(REG,), splits=("train",))
NO_DROPOUT = {k: 0.0 for k in ("attn", "relu", "res", "embed", "out")}
#: Which modality CASP's augmented view zeroes at each contrastive step (both sides cycle through it).
DROPS = ("audio", "text", "vision", "vision", "audio", "audio", "text", "vision", "text", "audio", "vision", "text")
#: MPLMM's seven available-modality cases (present text, audio, vision) and one batch mixing them.
CASES = {"t": (1, 0, 0), "a": (0, 1, 0), "v": (0, 0, 1), "ta": (1, 1, 0), "tv": (1, 0, 1), "av": (0, 1, 1),
         "tav": (1, 1, 1)}

#: (rtol, atol) per check: float32 rounding of the same sums taken in another order, with margin
#: (the README lists the differences measured when the fixtures were made).
TOLERANCE = {
    "cggm/loss": (0, 1e-6), "cggm/acc": (0, 0), "cggm/coeff": (1e-9, 0), "cggm/l_gm": (0, 1e-6),
    "cggm/grad": (1e-4, 1e-6), "cggm/grad_norm": (1e-4, 1e-6), "cggm/final": (0, 1e-5),
    "casp/forward": (0, 1e-5), "casp/nt_xent": (0, 5e-6), "casp/nt_xent_grad": (0, 1e-6),
    "casp/adapt_loss": (0, 1e-5), "casp/snapshots": (0, 1e-5), "casp/selected": (0, 0),
    "casp/pseudo_label": (0, 1e-5), "casp/final": (0, 1e-5),
    "mplmm/pred": (0, 1e-5), "mplmm/loss": (0, 1e-6), "mplmm/grad": (1e-4, 1e-6),
    "wander/tokens": (0, 1e-5), "wander/sequence": (0, 1e-5), "wander/readout": (0, 1e-5), "wander/grad": (1e-4, 1e-6),
}


def arrays(n: int, seed: int) -> dict[str, np.ndarray]:
    """A split of ``n`` samples: standard normal features whose first few steps are zero in some
    samples (zero-padded, as the MulT pickles, with every stored length the padded one), labels
    in tenths, every fourth exactly 0."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {"ids": np.array([f"s{i}" for i in range(n)])}
    for m, d, t in zip(NAMES, DIMS, LENGTHS):
        x = rng.normal(size=(n, t, d)).astype(np.float32)
        for i, k in enumerate(rng.integers(0, t // 2 + 1, size=n)):
            x[i, :k] = 0.0
        out[f"x/{m}"], out[f"len/{m}"] = x, np.full(n, t)
    y = np.round(rng.normal(scale=1.5, size=n), 1).astype(np.float32)
    y[::4] = 0.0
    out["y/score"] = y
    return out


def loader(n: int, seed: int, batch_size: int) -> SplitLoader:
    return SplitLoader(arrays(n, seed), SCHEMA, "score", batch_size=batch_size, shuffle=False, seed=0)


def backbone(name: str, **sizes) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return build_model(SCHEMA, REG, backbone=name, kernel=1, dropout=0.0, dropouts=NO_DROPOUT, **sizes)


def without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` without the key part of an attention's input bias. Its gradient is zero in exact arithmetic
    (a shift shared by all keys leaves the softmax unchanged), so Adam turns its rounding noise into
    learning-rate-sized steps of either sign, different on each side: trained weights are compared
    without it (its gradient is compared, at about 1e-9)."""
    if not name.endswith("in_proj_bias"):
        return t
    d = t.shape[0] // 3
    return torch.cat([t[:d], t[2 * d:]])


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


# -- CGGM (cggm_msa): 5 training steps of the shared loop with the hook ------------------------------------


class RecordingCGGM(CGGM):
    """CGGM that keeps its initial weights (the fixture's source) and, per step, the loss, the
    probes' batch accuracies, the coefficients, the direction term it built and the model's
    gradients after modulation (before clipping)."""

    def setup(self, model, loss_fn, optimizer):
        super().setup(model, loss_fn, optimizer)
        self.initial = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                        "probes": {k: v.clone() for k, v in self.probes.state_dict().items()}}
        self.steps: list[dict] = []

    def loss(self, model, batch, out, task_loss):
        total = super().loss(model, batch, out, task_loss)
        self._loss = float(total.detach())
        return total

    def after_backward(self, model, batch, out):
        super().after_backward(model, batch, out)
        self.steps.append({"loss": self._loss, "acc": [self.last_acc[m] for m in self.names],
                           "coeff": [self.last_coeffs[m] for m in self.names], "l_gm": self.last_l_gm,
                           "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}})


CGGM_SIZES = dict(d_model=8, layers=3, heads=2, fusion_layers=1)
CGGM_PARAMS = dict(rho=1.3, lam=0.2, cls_lr=5e-4, cls_layers=2, cls_dropout=0.0)


def cggm_ours() -> tuple[dict[str, np.ndarray], RecordingCGGM, torch.nn.Module]:
    """Five steps (40 samples, batches of 8) of ``fit`` with CGGM, MOSI's run-script values
    (rho 1.3, lambda 0.2, Adam 1e-3, classifiers Adam 5e-4, clip 0.8)."""
    model = backbone("cggm_msa", **CGGM_SIZES)
    hook = RecordingCGGM(**CGGM_PARAMS)
    torch.manual_seed(SEED + 1)  # the probes are built in fit's hook.setup
    fit(model, loader(40, SEED, 8), loader(8, SEED + 1, 8), hook,
        TrainConfig(epochs=1, batch_size=8, lr=1e-3, clip=0.8, device="cpu", pin_memory=False))
    s = hook.steps
    out = {"loss": _np([x["loss"] for x in s]), "acc": _np([x["acc"] for x in s]),
           "coeff": _np([x["coeff"] for x in s]), "l_gm": _np([x["l_gm"] for x in s]),
           "grad_norm": _np([[float(g.norm()) for g in x["grads"].values()] for x in s])}
    out.update({f"grad/{n}": _np(g) for n, g in s[0]["grads"].items()})
    out.update({f"final/{n}": _np(without_key_bias(n, p)) for n, p in model.named_parameters()})
    out.update({f"final/probes.{n}": _np(without_key_bias(n, p)) for n, p in hook.probes.named_parameters()})
    return out, hook, model


# -- CASP (casp_late, casp_early): forward, one contrastive step, and a whole offline run ------------------


CASP_SIZES = dict(d_model=8, layers=2, heads=2, fusion_layers=1)
CASP_PARAMS = dict(epochs=3, snapshot_every=1, pl_epochs=2, batch_size=4, selection="official_code",
                   label_use="official_code")


def casp_ours(name: str) -> tuple[dict[str, np.ndarray], torch.nn.Module]:
    """Forward and NT-Xent gradients on a 26-sample pool; then CASP as the code runs it on that pool
    (batches of 4, the last partial; the least stable 5%, i.e. 2 samples; checkpoints on the validation
    labels: 10 samples, zero labels among them, a partial last batch), the drops cycling :data:`DROPS`."""
    model = backbone(name, **CASP_SIZES)
    pool, valid = loader(26, SEED + 2, 26), loader(10, SEED + 3, 10)
    whole = pool.batch(np.arange(pool.n))
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        o = model.eval()(whole)
    out["forward/pred"], out["forward/representation"] = _np(o.pred), _np(o.representation)
    norms = layer_norm_parameters(model)
    for m in NAMES:
        model.train().zero_grad()
        loss = nt_xent(model(whole).representation, model(drop_modality(whole, m)).representation, 0.5)
        loss.backward()
        out[f"nt_xent/{m}"], out[f"nt_xent_grad/{m}"] = _np(loss), _np(torch.cat([p.grad.flatten() for p in norms]))
    model.zero_grad()

    drops, losses, chosen = itertools.cycle(DROPS), [], {}
    step, select = casp_module.clipped_step, casp_module.select_stable

    def recorded_step(optimiser, loss, clip):
        losses.append(float(loss.detach()))
        step(optimiser, loss, clip)

    def recorded_select(snapshots, selection, keep_quantile):
        target, keep = select(snapshots, selection, keep_quantile)
        chosen.update(snapshots=snapshots, keep=keep, target=target)
        return target, keep

    with ExitStack() as stack:
        for attr, new in (("clipped_step", recorded_step), ("select_stable", recorded_select),
                          ("random_drop_view", lambda b: drop_modality(b, next(drops)))):
            stack.enter_context(mock.patch.object(casp_module, attr, new))
        CASP(model, **CASP_PARAMS).adapt(SplitPool(pool), validate=lambda: model_predictions(model, valid))
    keep = np.flatnonzero(chosen["keep"])
    out.update({"adapt_loss": _np(losses), "snapshots": _np(chosen["snapshots"]), "selected": keep.astype(np.float64),
                "pseudo_label": _np(chosen["target"][keep]), "final/norms": _np(torch.cat([p.flatten() for p in norms])),
                "final/pred": _np(model_predictions(model, pool)[0])})
    return out, model


# -- MPLMM (mplmm_mult): the seven available-modality cases and a mixed batch --------------------------------


MPLMM_SIZES = dict(d_model=8, layers=2, heads=2, fusion_layers=1, position_padding=True)


def mplmm_model(init: str) -> torch.nn.Module:
    base = backbone("mplmm_mult", **MPLMM_SIZES)
    torch.manual_seed(SEED + 1)
    return build(TRANSFORMS, "mplmm", {"prompt_length": 3, "prompt_init": init}).apply(base)


def mplmm_ours(init: str) -> tuple[dict[str, np.ndarray], torch.nn.Module]:
    """Per case: predictions, L1 loss and the gradient of every trainable tensor (prompts, generator,
    input projections, output layer) on 8 samples with zero-padded steps (position rule on)."""
    model = mplmm_model(init).train()
    batch = loader(8, SEED + 4, 8).batch(np.arange(8))
    cases = {**CASES, "mixed": [p for _, p in zip(range(8), itertools.cycle(CASES.values()))]}
    out: dict[str, np.ndarray] = {}
    for case, present in cases.items():
        present = torch.tensor(present, dtype=torch.bool).expand(8, 3)
        model.zero_grad()
        pred = model(replace(batch, present=present)).pred
        loss = torch.nn.functional.l1_loss(pred, batch.y)
        loss.backward()
        out[f"{case}/pred"], out[f"{case}/loss"] = _np(pred), _np(loss)
        out.update({f"{case}/grad/{n}": _np(p.grad) for n, p in model.named_parameters()
                    if p.requires_grad and p.grad is not None})
    return out, model


# -- Wander (factor_form: code): the adapter on casp_late's encoder outputs ---------------------------------


WANDER_PARAMS = dict(rank=3, drank=2, trank=2, factor_form="code", readout="first_token", residual="first_tokens")


def wander_model() -> torch.nn.Module:
    base = backbone("casp_late", d_model=8, layers=1, heads=2, fusion_layers=1)
    torch.manual_seed(SEED + 1)
    return build(TRANSFORMS, "wander", WANDER_PARAMS).apply(base)


def wander_weights() -> torch.Tensor:
    """The fixed ``(B, d)`` weights of the scalar whose gradients are compared."""
    return torch.randn(8, 8, generator=torch.Generator().manual_seed(SEED))


def wander_ours() -> tuple[dict[str, np.ndarray], torch.nn.Module]:
    """The encoders' tokens, the adapter's fused sequence plus the code's residual (its whole output),
    the code's read-out (position 0, before our up-projection) and the gradients of
    ``sum(readout * wander_weights())``."""
    model = wander_model().train()
    batch = loader(8, SEED + 5, 8).batch(np.arange(8))
    tokens, pads = model.encode(batch)
    adapter = model.fusion.adapter
    x, p = [tokens[m] for m in NAMES], [pads[m] for m in NAMES]
    sequence = adapter.fuse(adapter.project(x, p)) + first_tokens(x, p, adapter.common_length)
    with mock.patch.object(adapter, "up", torch.nn.Identity()):
        readout = adapter(x, p)
    (readout * wander_weights()).sum().backward()
    out = {f"tokens/{m}": _np(tokens[m]) for m in NAMES}
    out.update({"sequence": _np(sequence), "readout": _np(readout)})
    out.update({f"grad/{n}": _np(q.grad) for n, q in adapter.named_parameters() if q.grad is not None})
    return out, model


# -- the checks ----------------------------------------------------------------------------------------------


def official(method: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{method}.npz") as f:
        return {k: f[k] for k in f.files}


def check(method: str, ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], group) -> None:
    """Every official number has its counterpart here within its check's tolerance (``group(key)`` names the check)."""
    assert set(theirs) <= set(ours), f"{method}: not computed here: {sorted(set(theirs) - set(ours))[:5]}"
    for key, want in theirs.items():
        name = f"{method}/{group(key)}"
        rtol, atol = TOLERANCE[name]
        got = ours[key]
        assert got.shape == want.shape, f"{key}: shape {got.shape}, official {want.shape}"
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{method} {key} ({name})")


def test_cggm_matches_the_released_code_over_five_steps():
    ours, _, _ = cggm_ours()
    check("cggm", ours, official("cggm"), lambda k: k.split("/")[0])


@pytest.mark.parametrize("name", ["casp_late", "casp_early"])
def test_casp_matches_the_released_code(name):
    ours, _ = casp_ours(name)
    theirs = {k.split("/", 1)[1]: v for k, v in official("casp").items() if k.startswith(f"{name}/")}
    check("casp", ours, theirs, lambda k: k.split("/")[0])


@pytest.mark.parametrize("init", ["normal", "zeros"])
def test_mplmm_matches_the_released_code_in_every_case(init):
    ours, _ = mplmm_ours(init)
    theirs = {k.split("/", 1)[1]: v for k, v in official("mplmm").items() if k.startswith(f"{init}/")}
    check("mplmm", ours, theirs, lambda k: k.split("/")[1])


def test_wander_code_form_matches_the_released_adapter():
    ours, _ = wander_ours()
    check("wander", ours, official("wander"), lambda k: k.split("/")[0])
