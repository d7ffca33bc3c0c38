"""The 3-D multimodal segmentation model, its loss, per-case Dice and a full train_job on a tiny BraTS store."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import default_config
from test_brats import make_case

from mmrepro import reproducibility
from mmrepro.config import run_spec
from mmrepro.data.brats import convert_brats
from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.data.store import write_store
from mmrepro.evaluate import evaluate_model, metric_kind, score
from mmrepro.jobs import train_job
from mmrepro.methods.balance.greedy import GreedyRebalancing
from mmrepro.methods.hooks import JointTraining
from mmrepro.metrics import DiceMeter, dice_per_region, segmentation_metrics
from mmrepro.models import MultimodalModel, build_model
from mmrepro.models.segmentation import SegmentationModel, check_method_support, unet_widths
from mmrepro.tracking import init_store
from mmrepro.train import TrainConfig, fit, segmentation_loss, task_loss_fn
from mmrepro.spec import MethodPlan

MODEL = dict(backbone="late", d_model=16, layers=1, heads=4, kernel=3, dropout=0.0, fusion_layers=1)
BRATS4 = ["flair", "t1ce", "t1", "t2"]


def volume_schema(names, shape, k=4) -> DatasetSchema:
    return DatasetSchema("vol", tuple(ModalitySpec(m, shape=(1, *shape)) for m in names),
                         (TaskSpec("seg", "segmentation", num_classes=k, shape=shape),), ("train", "valid"))


def seg_model(names, shape, **kw) -> SegmentationModel:
    schema = volume_schema(names, shape)
    return build_model(schema, schema.task("seg"), **{**MODEL, **kw})


def make_batch(names, shape, b=2, seed=0, present=None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(x={m: torch.randn(b, 1, *shape, generator=g) for m in names}, lengths={},
                 present=torch.ones(b, len(names), dtype=torch.bool) if present is None else present,
                 y=torch.randint(0, 4, (b, *shape), generator=g), index=torch.arange(b))


# ---------------------------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("names", [["flair", "t2"], BRATS4])
def test_output_shapes(names):
    shape = (12, 16, 10)  # not multiples of 8: padded inside, logits cropped back
    torch.manual_seed(0)
    model = seg_model(names, shape)
    assert isinstance(model, SegmentationModel) and model.task_type == "segmentation"
    assert model.widths == (8, 8, 8, 16) and list(model.encoders) == names
    out = model(make_batch(names, shape, b=3))
    assert out.pred.shape == (3, 4, *shape)
    bottleneck = math.prod(math.ceil(s / 8) for s in shape)  # 4 levels: /8
    assert bottleneck == 8
    for m in names:
        assert out.features[m].shape == (3, 16)
        assert out.tokens[m].shape == (3, bottleneck, 16)
        # features are the tokens averaged over the bottleneck voxels
        torch.testing.assert_close(out.features[m], out.tokens[m].mean(1))
    assert out.fused.shape == (3, 16)
    assert not torch.allclose(out.features[names[0]], out.features[names[1]])  # one encoder per modality
    out.pred.sum().backward()
    for m in names:  # every encoder takes part in the prediction
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders[m].parameters())


def test_builder_dispatch_and_sizes():
    schema = volume_schema(BRATS4, (16, 16, 16))
    task = schema.task("seg")
    for backbone in ("late", "mult", "unet3d"):  # a study's shared backbone key is ignored for volumes
        assert isinstance(build_model(schema, task, **{**MODEL, "backbone": backbone}), SegmentationModel)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model(schema, task, **{**MODEL, "backbone": "resnet"})
    deep = build_model(schema, task, **{**MODEL, "d_model": 64, "layers": 2})
    assert deep.widths == (8, 16, 32, 64) == unet_widths(64, 4)
    assert len(deep.encoders["t1"].stages[1]) == 2  # layers = blocks per level
    with pytest.raises(ValueError, match="single voxel"):
        tiny = volume_schema(BRATS4, (8, 8, 8))
        build_model(tiny, tiny.task("seg"), **MODEL)
    seq = DatasetSchema("s", (ModalitySpec("a", length=5, dim=3), ModalitySpec("b", length=4, dim=2)),
                        (TaskSpec("c", "classification", num_classes=3),), ("train",))
    assert isinstance(build_model(seq, seq.task("c"), **MODEL), MultimodalModel)  # sequences unchanged
    with pytest.raises(ValueError, match="for segmentation tasks"):
        build_model(seq, seq.task("c"), **{**MODEL, "backbone": "unet3d"})


def test_absent_modality_is_zeroed_at_the_input():
    shape = (16, 16, 16)
    torch.manual_seed(0)
    model = seg_model(["flair", "t2"], shape).eval()
    present = torch.tensor([[True, True], [True, False]])
    batch = make_batch(["flair", "t2"], shape, present=present)
    zeroed = make_batch(["flair", "t2"], shape)
    zeroed.x["t2"][1] = 0.0  # what an absent modality must look like to the network
    full = make_batch(["flair", "t2"], shape)  # the same data, all present
    with torch.no_grad():
        out, ref, unmasked = model(batch), model(zeroed), model(full)
    torch.testing.assert_close(out.pred, ref.pred)
    torch.testing.assert_close(out.features["t2"], ref.features["t2"])
    assert not torch.allclose(out.pred[1], unmasked.pred[1], atol=1e-4)  # the mask changed sample 1 ...
    torch.testing.assert_close(out.pred[0], unmasked.pred[0])  # ... and nothing else


# ---------------------------------------------------------------------------------------------
# Loss


def cggm_seg_loss(logits, target, weight, alpha=0.5, smooth=0.01):
    """Independent one-hot reading of CGGM's SegLoss: pooled soft Dice over classes 1.. + weighted CE."""
    k = logits.shape[1]
    p = logits.softmax(1).flatten(2)[:, 1:]
    g = F.one_hot(target, k).movedim(-1, 1).flatten(2)[:, 1:].float()
    dice = 2 * (p * g).sum() / (p.sum() + g.sum() + smooth)
    w = torch.tensor(weight)
    ce = -(w[target] * logits.log_softmax(1).gather(1, target[:, None])[:, 0]).sum() / w[target].sum()
    return (1 - alpha) * ce + alpha * (1 - dice)


def test_loss_is_cggm_segloss_and_reductions_are_per_case():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, 6, 4)
    y = torch.randint(0, 4, (3, 5, 6, 4))
    assert task_loss_fn("segmentation") is segmentation_loss
    weights = (0.2, 0.3, 0.25, 0.25)  # CGGM's default for 4 classes
    torch.testing.assert_close(segmentation_loss(logits, y), cggm_seg_loss(logits, y, weights))
    assert not torch.allclose(segmentation_loss(logits, y), cggm_seg_loss(logits, y, (1.0, 1.0, 1.0, 1.0)))
    per_case = segmentation_loss(logits, y, "none")
    assert per_case.shape == (3,)
    for i in range(3):  # "none" is each case alone; "sum" their sum
        torch.testing.assert_close(per_case[i], cggm_seg_loss(logits[i:i + 1], y[i:i + 1], weights))
    torch.testing.assert_close(segmentation_loss(logits, y, "sum"), per_case.sum())
    # a confident correct prediction: CE ~ 0 and Dice ~ 1
    perfect = F.one_hot(y, 4).movedim(-1, 1).float() * 50
    assert float(segmentation_loss(perfect, y)) < 1e-3
    # other class counts: equal weights
    y3 = y.clamp(max=2)
    torch.testing.assert_close(segmentation_loss(logits[:, :3], y3),
                               cggm_seg_loss(logits[:, :3], y3, (1.0, 1.0, 1.0)))


# ---------------------------------------------------------------------------------------------
# Dice


def test_dice_per_case_hand_computed_with_empty_regions():
    # case 0 (flat 8 voxels): truth ET {6,7}, TC {4,5,6,7}, WT {2..7}; pred ET {5,6}, TC {3,4,5,6}, WT {1..6}
    t0 = np.array([0, 0, 2, 2, 1, 1, 3, 3])
    p0 = np.array([0, 2, 2, 1, 1, 3, 3, 0])
    d0 = {"dice_et": 2 * 1 / 4, "dice_tc": 2 * 3 / 8, "dice_wt": 2 * 5 / 12}
    # case 1: no ET in truth or prediction (empty in both -> 1.0), TC = WT: truth {0,1}, pred {1}
    t1 = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    p1 = np.array([0, 1, 0, 0, 0, 0, 0, 0])
    d1 = {"dice_et": 1.0, "dice_tc": 2 / 3, "dice_wt": 2 / 3}
    # case 2: an empty truth and one voxel predicted ET (so also TC and WT): all three 0.0
    t2 = np.zeros(8, int)
    p2 = np.array([3, 0, 0, 0, 0, 0, 0, 0])
    d2 = {"dice_et": 0.0, "dice_tc": 0.0, "dice_wt": 0.0}
    pred, truth = np.stack([p0, p1, p2]), np.stack([t0, t1, t2])
    expected = {k: (d0[k] + d1[k] + d2[k]) / 3 for k in d0}
    expected["dice_mean"] = sum(expected.values()) / 3
    got = segmentation_metrics(pred, truth)
    assert got == pytest.approx(expected)
    # per case, not pooled over the voxels of all cases
    assert dice_per_region(pred, truth)["dice_et"] != pytest.approx(expected["dice_et"])
    # batch by batch gives the same as all at once
    meter = DiceMeter()
    meter.update(pred[:1], truth[:1])
    meter.update(pred[1:], truth[1:])
    assert meter.result() == pytest.approx(expected) and meter.n == 3
    # score(): logits are reduced by argmax over the class axis
    task = TaskSpec("seg", "segmentation", num_classes=4, shape=(8,))
    assert metric_kind(task) == "segmentation"
    logits = np.moveaxis(np.eye(4)[pred], -1, 1)  # (3, 4, 8)
    assert score(task, logits, truth) == pytest.approx(expected)
    assert score(task, pred, truth) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no case"):
        DiceMeter().result()


# ---------------------------------------------------------------------------------------------
# Training


def blobs(n, shape=(16, 16, 16), seed=0):
    """Nested spheres (oedema r<7, necrosis r<5, enhancing r<3.5) that two modalities reveal:
    ``flair`` bright on the whole tumour, ``t1ce`` grading the core."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), 0).astype(np.float32)
    x = {"flair": np.zeros((n, 1, *shape), np.float32), "t1ce": np.zeros((n, 1, *shape), np.float32)}
    y = np.zeros((n, *shape), np.uint8)
    for i in range(n):
        centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
        r = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
        y[i][r < 7] = 2
        y[i][r < 5] = 1
        y[i][r < 3.5] = 3
        x["flair"][i, 0] = (r < 7) + 0.3 * rng.standard_normal(shape)
        x["t1ce"][i, 0] = (r < 5) + (r < 3.5) + 0.3 * rng.standard_normal(shape)
    return {"x/flair": x["flair"], "x/t1ce": x["t1ce"], "y/seg": y, "ids": np.array([f"c{i}" for i in range(n)])}


def test_overfits_two_cases_loss_falls_and_dice_rises():
    reproducibility.configure(0, 1)
    arrays = blobs(2)
    schema = volume_schema(["flair", "t1ce"], (16, 16, 16))
    loader = lambda shuffle: SplitLoader(arrays, schema, "seg", batch_size=2, shuffle=shuffle, seed=0)  # noqa: E731
    model = build_model(schema, schema.task("seg"), **MODEL)
    before = evaluate_model(model, loader(False), schema.task("seg"))
    result = fit(model, loader(True), loader(False), JointTraining(),
                 TrainConfig(epochs=40, batch_size=2, lr=1e-2, patience=100, device="cpu"))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.3 * losses[0]
    assert result.history[-1]["valid_loss"] < 0.3 * result.history[0]["valid_loss"]
    model.load_state_dict(result.best_state)
    after = evaluate_model(model, loader(False), schema.task("seg"))
    assert before["dice_mean"] < 0.4, before
    assert after["dice_mean"] > 0.85 and min(after[k] for k in ("dice_et", "dice_tc", "dice_wt")) > 0.7, after


def test_greedy_runs_on_segmentation_and_unsupported_hooks_fail_clearly():
    reproducibility.configure(0, 1)
    arrays = blobs(2, shape=(8, 8, 16))
    schema = volume_schema(["flair", "t1ce"], (8, 8, 16))
    ld = SplitLoader(arrays, schema, "seg", batch_size=1, shuffle=False, seed=0)
    model = build_model(schema, schema.task("seg"), **MODEL)
    hook = GreedyRebalancing(start_epoch=1, window=1, epsilon=0.0)
    result = fit(model, ld, ld, hook, TrainConfig(epochs=2, batch_size=1, lr=1e-3, device="cpu"))
    values = result.history[-1]
    assert math.isfinite(values["greedy_speed_flair"]) and math.isfinite(values["greedy_speed_t1ce"])
    assert values["greedy_rebalance_flair"] + values["greedy_rebalance_t1ce"] > 0  # it re-balanced
    task = schema.task("seg")
    check_method_support(task, MethodPlan("full_finetune", "joint", "source_only"))
    for hook_name in ("ogm_ge", "agm", "pmr", "mslr"):
        with pytest.raises(ValueError, match=f"hook '{hook_name}' is not supported for segmentation"):
            check_method_support(task, MethodPlan("full_finetune", hook_name, "source_only"))
    with pytest.raises(ValueError, match="transform 'lora' is not supported for segmentation"):
        check_method_support(task, MethodPlan("lora", "joint", "source_only"))
    check_method_support(TaskSpec("c", "classification", num_classes=2),  # other tasks: anything goes
                         MethodPlan("lora", "cggm", "tent"))


# ---------------------------------------------------------------------------------------------
# The ordinary pipeline path: converted BraTS store -> train_job -> metrics.json


@pytest.fixture(scope="module")
def brats_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("brats")
    for i in range(5):
        make_case(tmp / "raw", i)
    (tmp / "scratch").mkdir()
    schema, splits, prov = convert_brats(tmp / "raw", name="brats", crop=(16, 16, 16), seed=3,
                                         splits={"train": 0.6, "valid": 0.2, "test": 0.2}, scratch_dir=tmp / "scratch")
    write_store(tmp / "store", schema, splits, prov)
    return tmp / "store"


def brats_spec(tmp_path, hook="joint"):
    spec = run_spec(default_config(), "balance", "synth", "joint", "complete", 0)
    return replace(spec, dataset="brats2021", task="seg", results=str(tmp_path / "results"),
                   tracking=replace(spec.tracking, uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), utilisation_probes=True,
                   model=replace(spec.model, **{**MODEL, "backbone": "late"}),
                   train=TrainConfig(epochs=2, batch_size=2, lr=1e-3, weight_decay=0.0, patience=4, clip=1.0,
                                     device="cpu"),
                   plan=replace(spec.plan, hook=hook), method_params={**spec.method_params, hook: {}})


def test_train_job_on_a_tiny_brats_store(brats_store, tmp_path, caplog):
    spec = brats_spec(tmp_path)
    init_store(spec.tracking.uri, ["balance"], tmp_path / "artifacts")
    with caplog.at_level(logging.WARNING, logger="mmrepro.jobs"):
        summary = train_job(spec, brats_store, tmp_path / "run", threads=1)
    assert "utilisation probes" in caplog.text  # skipped for segmentation, and said so
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["task"] == "segmentation" and written["backbone"] == "unet3d" and written["label"] == "seg"
    for split in ("valid", "test"):
        assert set(written["metrics"][split]) == {"dice_et", "dice_tc", "dice_wt", "dice_mean"}
        vals = written["metrics"][split]
        assert all(0.0 <= v <= 1.0 for v in vals.values())
        assert vals["dice_mean"] == pytest.approx((vals["dice_et"] + vals["dice_tc"] + vals["dice_wt"]) / 3)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all(math.isfinite(h["valid_loss"]) for h in history)
    assert not any(k.startswith("util_") for k in history[0])
    assert written["total_params"] == sum(
        p.numel() for p in torch.load(tmp_path / "run" / "model.pt")["state_dict"].values()
        if p.is_floating_point())


def test_train_job_rejects_an_unsupported_hook_before_training(brats_store, tmp_path):
    spec = brats_spec(tmp_path, hook="ogm_ge")
    with pytest.raises(ValueError, match="hook 'ogm_ge' is not supported for segmentation"):
        train_job(spec, brats_store, tmp_path / "run", threads=1)
    assert not (tmp_path / "run" / "history.json").exists()
