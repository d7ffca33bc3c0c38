"""Hand-worked cases for mmrepro.metrics (MMSA definitions; see the module docstring)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmrepro import metrics
from mmrepro.metrics import (
    METRIC_DIRECTIONS,
    classification_metrics,
    compute,
    dice_per_region,
    regression_metrics,
    sims_metrics,
    weighted_f1,
)

# --------------------------------------------------------------------------------------------
# MOSI / MOSEI regression

# Two truths are exactly 0, one prediction is exactly 0 on a non-zero truth, one prediction is
# beyond 3.
REG_TRUTH = [-2.0, -0.4, 0.0, 0.0, 1.2, 2.6]
REG_PRED = [0.4, 0.0, -0.2, 0.0, 0.9, 3.7]


def test_regression_has0_vs_non0_hand_computed():
    m = regression_metrics(REG_PRED, REG_TRUTH)
    # has-0, ">= 0" on both sides, all 6 kept:
    #   truth>=0 = F F T T T T ; pred>=0 = T T F T T T ; hits at idx 3,4,5 -> 3/6
    #   (a "> 0" rule would give 5/6)
    assert m["acc2_has0"] == pytest.approx(0.5)
    #   class F (support 2): tp 0 -> F1 0
    #   class T (support 4): tp 3 (3,4,5), fp 2 (0,1), fn 1 (2) -> 2*3/(6+2+1) = 2/3
    #   weighted = (2*0 + 4*2/3)/6 = 4/9
    assert m["f1_has0"] == pytest.approx(4 / 9)
    # non-0: drop idx 2,3 (truth == 0), "> 0" on both sides, keep idx 0,1,4,5:
    #   truth>0 = F F T T ; pred>0 = T F T T (pred 0.0 is negative) -> 3/4
    #   (">= 0" would give 2/4; also dropping pred==0 would keep 3 samples -> 2/3)
    assert m["acc2_non0"] == pytest.approx(0.75)
    #   class F (support 2): tp 1, fp 0, fn 1 -> 2/3 ; class T (support 2): tp 2, fp 1 -> 4/5
    #   weighted = (2/3 + 4/5)/2 = 11/15
    assert m["f1_non0"] == pytest.approx(11 / 15)
    # MAE on raw values: 2.4 + 0.4 + 0.2 + 0 + 0.3 + 1.1 = 4.4 -> 4.4/6
    assert m["mae"] == pytest.approx(4.4 / 6)
    # Acc-7: clip to [-3,3] -> pred 3.7 becomes 3; round pred 0,0,-0,0,1,3 vs truth -2,-0,0,0,1,3
    #   -> 5/6 (without the clip, round(3.7)=4 != 3 -> 4/6)
    assert m["acc7"] == pytest.approx(5 / 6)
    # Acc-5: clip to [-2,2]; round pred 0,0,-0,0,1,2 vs truth -2,-0,0,0,1,2 -> 5/6
    assert m["acc5"] == pytest.approx(5 / 6)
    # Pearson on raw values
    assert m["corr"] == pytest.approx(np.corrcoef(REG_PRED, REG_TRUTH)[0, 1])
    assert set(m) == {"mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7"}
    assert all(type(v) is float for v in m.values())


def test_acc7_uses_bankers_rounding():
    # np.round: 2.5 -> 2, 0.5 -> 0, -1.5 -> -2, -2.5 -> -2 ; all equal to truth -> 4/4.
    # Round-half-up would give 3, 1, -1, -2 -> 1/4.
    m = regression_metrics([2.5, 0.5, -1.5, -2.5], [2.0, 0.0, -2.0, -2.0])
    assert m["acc7"] == 1.0


def test_acc5_clips_to_pm2_and_acc7_to_pm3():
    pred = [2.4, -2.6, 1.6]
    truth = [3.0, -3.0, 2.9]
    m = regression_metrics(pred, truth)
    # Acc-5: clip -> pred 2, -2, 1.6 ; truth 2, -2, 2 ; round -> 2,-2,2 vs 2,-2,2 -> 3/3
    assert m["acc5"] == 1.0
    # Acc-7: clip [-3,3] changes nothing; round pred 2,-3,2 vs truth 3,-3,3 -> 1/3
    assert m["acc7"] == pytest.approx(1 / 3)


def test_corr_zero_variance_is_zero_and_single_sample_ok():
    m = regression_metrics([0.5, 0.5, 0.5], [1.0, -1.0, 2.0])
    assert m["corr"] == 0.0
    assert regression_metrics([1.0], [2.0])["corr"] == 0.0
    # perfect linear relation still gives 1
    assert regression_metrics([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])["corr"] == pytest.approx(1.0)


def test_non0_is_nan_when_every_truth_is_zero():
    m = regression_metrics([0.3, -0.2], [0.0, 0.0])
    assert math.isnan(m["acc2_non0"]) and math.isnan(m["f1_non0"])
    # has-0: truth T T ; pred T F -> 1/2
    assert m["acc2_has0"] == 0.5


def test_regression_flattens_column_vectors():
    m1 = regression_metrics(np.array(REG_PRED)[:, None], np.array(REG_TRUTH)[:, None])
    m2 = regression_metrics(REG_PRED, REG_TRUTH)
    assert m1 == m2


# --------------------------------------------------------------------------------------------
# CH-SIMS


def test_sims_bins_hand_computed():
    truth = [-0.8, -0.1, 0.0, 0.1, 0.7, 1.0]
    pred = [-1.3, -0.2, 0.05, 0.15, 0.72, 0.75]
    m = sims_metrics(pred, truth)
    # clip pred -> -1.0, -0.2, 0.05, 0.15, 0.72, 0.75 (bins are (lo, hi], edges on the right)
    # Acc-2 [-1,0],(0,1]: truth 0 0 0 1 1 1 ; pred 0 0 1 1 1 1 -> 5/6 (truth 0.0 is negative)
    assert m["acc2"] == pytest.approx(5 / 6)
    # F1: class 0 (support 3): tp 2, fp 0, fn 1 -> 4/5 ; class 1 (support 3): tp 3, fp 1 -> 6/7
    #     weighted = (4/5 + 6/7)/2 = 29/35
    assert m["f1"] == pytest.approx(29 / 35)
    # Acc-3 edges -0.1, 0.1: truth 0 0 1 1 2 2 ; pred 0 0 1 2 2 2 -> 5/6 (truth 0.1 is neutral)
    assert m["acc3"] == pytest.approx(5 / 6)
    # Acc-5 edges -0.7,-0.1,0.1,0.7: truth 0 1 2 2 3 4 ; pred 0 1 2 3 4 4 -> 4/6 (truth 0.7 is 3)
    assert m["acc5"] == pytest.approx(4 / 6)
    # MAE on clipped values: 0.2 + 0.1 + 0.05 + 0.05 + 0.02 + 0.25 = 0.67 (unclipped: 0.97)
    assert m["mae"] == pytest.approx(0.67 / 6)
    clipped = np.clip(pred, -1, 1)
    assert m["corr"] == pytest.approx(np.corrcoef(clipped, truth)[0, 1])
    assert set(m) == {"mae", "corr", "acc2", "f1", "acc3", "acc5"}


def test_sims_bins_compare_in_float32_like_mmsa():
    # float32(0.1) = 0.1000000015 and float32(-0.7) = -0.6999999881 sit on the closed upper edges
    # when compared in float32 (as MMSA does): truth classes a5 = 2, 0 ; a3 = 1, 0.
    # pred (float64) 0.0 -> a5 2, a3 1 ; -0.9 -> a5 0, a3 0 -> all hits.
    # Widening the float32 truth to float64 first would move it to a5 = 3, 1 and a3 = 2, 0.
    truth = np.array([0.1, -0.7], dtype=np.float32)
    pred = np.array([0.0, -0.9], dtype=np.float64)
    m = sims_metrics(pred, truth)
    assert m["acc5"] == 1.0
    assert m["acc3"] == 1.0


# --------------------------------------------------------------------------------------------
# classification / weighted F1

CLS_TRUTH = [0, 0, 0, 0, 0, 0, 1, 1, 1, 2]  # supports 6, 3, 1
CLS_PRED = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]


def test_weighted_f1_imbalanced_three_classes():
    # class 0: tp 4 (idx 0-3), fp 2 (idx 8,9), fn 2 (idx 4,5) -> 8/(8+2+2) = 2/3
    # class 1: tp 2 (idx 6,7), fp 2 (idx 4,5), fn 1 (idx 8)   -> 4/(4+2+1) = 4/7
    # class 2: tp 0                                            -> 0
    # weighted by support: (6*2/3 + 3*4/7 + 1*0)/10 = (4 + 12/7)/10 = 4/7
    # (macro would be 26/63, micro = accuracy = 0.6)
    assert weighted_f1(CLS_PRED, CLS_TRUTH) == pytest.approx(4 / 7)
    m = classification_metrics(CLS_PRED, CLS_TRUTH)
    assert m == pytest.approx({"acc": 0.6, "f1_weighted": 4 / 7})


def test_weighted_f1_class_only_in_pred_has_zero_weight():
    # classes {0,1,2}; class 2 only predicted (support 0, weight 0).
    # class 0: tp 1, fp 0, fn 1 -> 2/3 ; class 1: tp 2, fp 0, fn 0 -> 1
    # weighted = (2*2/3 + 2*1)/4 = 5/6
    assert weighted_f1([0, 2, 1, 1], [0, 0, 1, 1]) == pytest.approx(5 / 6)


def test_classification_from_logits_uses_argmax():
    scores = np.full((len(CLS_PRED), 3), -1.0)
    scores[np.arange(len(CLS_PRED)), CLS_PRED] = 2.0
    m = classification_metrics(scores, np.array(CLS_TRUTH), num_classes=3)
    assert m == pytest.approx({"acc": 0.6, "f1_weighted": 4 / 7})


def test_classification_rejects_bad_labels():
    with pytest.raises(ValueError, match="pred.*not whole numbers"):
        classification_metrics([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match=r"truth has 1 label\(s\) outside \[0, 2\)"):
        classification_metrics([0, 1], [0, 2], num_classes=2)
    with pytest.raises(ValueError, match="4 classes but num_classes=3"):
        classification_metrics(np.zeros((2, 4)), [0, 1], num_classes=3)


# --------------------------------------------------------------------------------------------
# BraTS Dice

SEG_TRUTH = np.array([0, 0, 1, 1, 2, 2, 4, 4, 0, 0, 0, 0]).reshape(2, 2, 3)
SEG_PRED = np.array([0, 1, 1, 1, 2, 4, 4, 0, 2, 0, 0, 0]).reshape(2, 2, 3)


def test_dice_per_region_hand_computed():
    # flat indices; ET={4}: truth {6,7}, pred {5,6}, inter {6}: 2*1/(2+2) = 1/2
    # TC={1,4}: truth {2,3,6,7}, pred {1,2,3,5,6}, inter {2,3,6}: 2*3/(4+5) = 2/3
    # WT={1,2,4}: truth {2,3,4,5,6,7}, pred {1,2,3,4,5,6,8}, inter {2,3,4,5,6}: 2*5/(6+7) = 10/13
    d = dice_per_region(SEG_PRED, SEG_TRUTH)
    expected = {"dice_et": 0.5, "dice_tc": 2 / 3, "dice_wt": 10 / 13}
    expected["dice_mean"] = (0.5 + 2 / 3 + 10 / 13) / 3
    assert d == pytest.approx(expected)


def test_dice_label3_is_alias_of_4():
    pred3 = np.where(SEG_PRED == 4, 3, SEG_PRED)
    assert dice_per_region(pred3, SEG_TRUTH) == pytest.approx(dice_per_region(SEG_PRED, SEG_TRUTH))


def test_dice_empty_region_conventions():
    truth = np.array([[[0, 1], [2, 0]]])
    # no 4 anywhere: ET empty in both -> 1.0 ; TC, WT identical -> 1.0
    assert dice_per_region(truth, truth) == {"dice_et": 1.0, "dice_tc": 1.0, "dice_wt": 1.0, "dice_mean": 1.0}
    # pred has an ET voxel the truth lacks -> ET 0.0
    pred = np.array([[[4, 1], [2, 0]]])
    d = dice_per_region(pred, truth)
    assert d["dice_et"] == 0.0
    # TC: truth {1}, pred {0,1} -> 2/3 ; WT: truth {1,2}, pred {0,1,2} -> 4/5
    assert d["dice_tc"] == pytest.approx(2 / 3)
    assert d["dice_wt"] == pytest.approx(4 / 5)


def test_dice_rejects_unknown_labels_and_shapes():
    with pytest.raises(ValueError, match=r"pred has 2 voxel\(s\) with labels \[5\]"):
        dice_per_region([0, 5, 5], [0, 1, 2])
    with pytest.raises(ValueError, match="shape mismatch"):
        dice_per_region(np.zeros((2, 3)), np.zeros((3, 2)))


# --------------------------------------------------------------------------------------------
# input validation, directions, dispatch


@pytest.mark.parametrize("fn", [regression_metrics, sims_metrics, classification_metrics, weighted_f1])
def test_length_mismatch(fn):
    with pytest.raises(ValueError, match="has 3 values but .* has 2"):
        fn([0, 1, 0], [0, 1])


@pytest.mark.parametrize("fn", [regression_metrics, sims_metrics, classification_metrics, dice_per_region])
def test_empty_inputs(fn):
    with pytest.raises(ValueError, match="pred is empty"):
        fn([], [])


def test_non_finite_values_are_counted_per_argument():
    with pytest.raises(ValueError, match=r"pred has 2 non-finite value\(s\) of 4 \(1 NaN, 1 inf\)"):
        regression_metrics([np.nan, np.inf, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"truth has 1 non-finite"):
        sims_metrics([0.0, 0.5], [0.0, -np.inf])
    with pytest.raises(ValueError, match=r"pred has 1 non-finite"):
        classification_metrics(np.array([[0.1, np.nan], [1.0, 0.0]]), [0, 1])
    with pytest.raises(ValueError, match="must be real numeric"):
        regression_metrics(["a", "b"], [0.0, 1.0])


def test_metric_directions_cover_every_key():
    keys = set()
    keys |= set(regression_metrics(REG_PRED, REG_TRUTH))
    keys |= set(sims_metrics([0.1, 0.2], [0.3, -0.2]))
    keys |= set(classification_metrics([0, 1], [0, 1]))
    keys |= set(dice_per_region([0, 1], [0, 2]))
    assert keys == set(METRIC_DIRECTIONS)
    assert {k for k, v in METRIC_DIRECTIONS.items() if v == "min"} == {"mae"}
    assert set(METRIC_DIRECTIONS.values()) == {"min", "max"}


def test_compute_dispatch_and_unknown_task():
    assert compute("regression", REG_PRED, REG_TRUTH) == regression_metrics(REG_PRED, REG_TRUTH)
    assert compute("sims_regression", [0.1, 0.5], [0.2, -0.3]) == sims_metrics([0.1, 0.5], [0.2, -0.3])
    assert compute("classification", CLS_PRED, CLS_TRUTH, num_classes=3) == pytest.approx(
        {"acc": 0.6, "f1_weighted": 4 / 7})
    assert compute("segmentation", SEG_PRED, SEG_TRUTH) == dice_per_region(SEG_PRED, SEG_TRUTH)
    with pytest.raises(ValueError, match=r"unknown task 'mosi'.*classification, regression, segmentation, sims_regression"):
        compute("mosi", [0.0], [0.0])
    assert set(metrics.TASKS) == {"regression", "sims_regression", "classification", "segmentation"}
