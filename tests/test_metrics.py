"""Evaluation metrics against hand-computed small cases (and sklearn on random tied data)."""
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from mimood.eval.metrics import best_dice, detection_metrics, dice, pixel_metrics, token_labels, token_metrics
from mimood.ood.scan import topk_mean


def test_pixel_metrics_hand_case():
    # sorted: 0.8(+) 0.4(-) 0.35(+) 0.1(-); AUROC = 3/4 pairs; AP = 0.5*1 + 0.5*2/3
    # Dice: t=0.8 -> 2/3, t=0.4 -> 1/2, t=0.35 -> 4/5, t=0.1 -> 2/3
    m = pixel_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert m["auroc"] == pytest.approx(0.75)
    assert m["ap"] == pytest.approx(5 / 6)
    assert m["dice"] == pytest.approx(0.8)
    assert m["threshold"] == pytest.approx(0.35)


def test_pixel_metrics_mask_excludes_pixels():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    labels = np.array([0, 0, 1, 1, 0])
    # unmasked, the 0.9 negative beats both positives: AUROC = 3/6
    assert pixel_metrics(scores, labels)["auroc"] == pytest.approx(0.5)
    m = pixel_metrics(scores, labels, mask=[1, 1, 1, 1, 0])
    assert (m["auroc"], m["ap"], m["dice"]) == pytest.approx((0.75, 5 / 6, 0.8))


def test_best_dice_ties_are_one_threshold():
    # the three 0.7 scores (2 positive, 1 negative) go in or out together:
    # t=0.9: 2*1/(1+0+3)=0.5; t=0.7: 2*3/(3+1+3)=6/7; t=0.2: 2*3/(3+2+3)=0.75
    scores = np.array([0.9, 0.7, 0.7, 0.7, 0.2], dtype=np.float32)
    labels = np.array([1, 1, 0, 1, 0], dtype=bool)
    d, t = best_dice(scores, labels)
    assert d == pytest.approx(6 / 7)
    assert t == pytest.approx(0.7)
    assert dice(scores >= t, labels) == pytest.approx(d)


def test_best_dice_equal_maxima_take_highest_threshold():
    # t=0.8: 2/3, t=0.6: 1/2, t=0.4: 2/5, t=0.3: 4/6 = 2/3 -> the higher threshold 0.8
    assert best_dice([0.8, 0.6, 0.4, 0.3], [1, 0, 0, 1]) == pytest.approx((2 / 3, 0.8))


def test_one_class_gives_nan():
    d, t = best_dice([0.1, 0.2], [0, 0])
    assert math.isnan(d) and math.isnan(t)
    m = pixel_metrics([0.1, 0.2], [1, 1])
    assert all(math.isnan(v) for v in m.values())
    assert all(math.isnan(v) for v in detection_metrics([0.3, 0.4], [0, 0]).values())


def test_dice_edge_cases():
    assert dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    assert dice([1, 0], [0, 0]) == 0.0
    assert dice([0, 0], [0, 1]) == 0.0
    assert dice([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert dice([1, 1, 0], [1, 1, 0]) == 1.0
    with pytest.raises(ValueError, match="shape"):
        dice([1, 0], [1, 0, 0])


def test_nan_and_bad_labels_raise():
    with pytest.raises(ValueError, match="2 NaN"):
        pixel_metrics([0.1, np.nan, 0.3, np.nan], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="1 NaN"):
        detection_metrics([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="infinite"):
        best_dice([0.1, np.inf], [0, 1])
    with pytest.raises(ValueError, match="0/1"):
        pixel_metrics([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="empty"):
        pixel_metrics([0.1, 0.2], [0, 1], mask=[0, 0])


def test_curve_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(2000), 2).astype(np.float32)   # ~100 distinct values: many ties
    labels = rng.random(2000) < 0.2
    m = pixel_metrics(scores, labels)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    p, r, t = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = 2 * p * r / (p + r)
    assert m["dice"] == pytest.approx(np.nanmax(f1), abs=1e-12)
    assert m["threshold"] == t[np.nanargmax(f1[:-1])]
    assert dice(scores >= m["threshold"], labels) == pytest.approx(m["dice"], abs=1e-12)


def _hand_mask():
    gt = np.zeros((1, 16, 16), dtype=bool)
    gt[0, 3, 5] = True              # token (0,0): 1 of 64 pixels
    gt[0, 0:4, 8:16] = True         # token (0,1): 32 of 64, exactly half
    gt[0, 8:12, 0:8] = True         # token (1,0): 32 + 1 = 33 of 64
    gt[0, 12, 0] = True
    return gt                       # token (1,1): empty


def test_token_labels_any_vs_majority():
    gt = _hand_mask()
    np.testing.assert_array_equal(token_labels(gt, rule="any")[0], [[True, True], [True, False]])
    np.testing.assert_array_equal(token_labels(gt, rule="majority")[0], [[False, False], [True, False]])
    assert token_labels(np.zeros((3, 160, 160), bool)).shape == (3, 20, 20)
    with pytest.raises(ValueError, match="multiples"):
        token_labels(np.zeros((1, 12, 16), bool))
    with pytest.raises(ValueError, match="rule"):
        token_labels(gt, rule="all")


def test_token_metrics_with_mask():
    scores = np.array([[[0.9, 0.2], [0.6, 0.7]]])
    gt = token_labels(_hand_mask(), rule="majority")     # only token (1,0) is positive
    # all 4 tokens: positive 0.6 beats only 0.2 -> AUROC 1/3; ranks 3rd -> AP 1/3
    assert token_metrics(scores, gt) == pytest.approx({"ap": 1 / 3, "auroc": 1 / 3})
    # drop the 0.9 and 0.7 tokens (e.g. background): the positive now ranks first
    mask = np.array([[[False, True], [True, False]]])
    assert token_metrics(scores, gt, mask) == pytest.approx({"ap": 1.0, "auroc": 1.0})


def test_detection_metrics_hand_case():
    pos = [0.9, 0.8, 0.3]
    neg = [0.85, 0.3, 0.1, 0.2]
    scores = np.array(pos + neg)
    is_anom = np.array([1] * 3 + [0] * 4, dtype=bool)
    m = detection_metrics(scores, is_anom)
    # pairs won: 0.9 -> 4, 0.8 -> 3, 0.3 -> 2 + tie 0.5; of 12
    assert m["auroc"] == pytest.approx(9.5 / 12)
    # ranks: .9+ (P=1, R=1/3) .85- .8+ (2/3, 2/3) {.3+, .3-} (3/5, 1)
    assert m["aupr"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # 95% of 3 positives needs all 3: t = 0.3; negatives >= 0.3 (tie included): 0.85, 0.3
    assert m["fpr95"] == pytest.approx(0.5)


def test_fpr95_threshold_uses_ceil_of_95_percent():
    pos = np.arange(1, 21, dtype=float)          # 20 anomalies: 19 must pass, t = 19th highest = 2.0
    neg = np.array([0.5, 1.5, 2.0, 2.5, 3.0])    # >= 2.0: 2.0, 2.5, 3.0
    m = detection_metrics(np.r_[pos, neg], np.r_[np.ones(20), np.zeros(5)])
    assert m["fpr95"] == pytest.approx(3 / 5)
    pos21 = np.arange(1, 22, dtype=float)        # 21 anomalies: ceil(19.95) = 20 pass, t = 2.0 again
    m = detection_metrics(np.r_[pos21, neg], np.r_[np.ones(21), np.zeros(5)])
    assert m["fpr95"] == pytest.approx(3 / 5)
    pos19 = np.arange(2, 21, dtype=float)        # 19 anomalies 2..20: ceil(18.05) = 19, t = 2.0
    m = detection_metrics(np.r_[pos19, neg], np.r_[np.ones(19), np.zeros(5)])
    assert m["fpr95"] == pytest.approx(3 / 5)


def test_topk_mean():
    v = np.arange(1, 11, dtype=float)
    assert topk_mean(v, 3) == pytest.approx(9.0)
    assert topk_mean(v, 1) == 10.0
    assert topk_mean(v, 100) == pytest.approx(5.5)           # capped at n
    assert topk_mean(v, 0.25) == pytest.approx(9.0)          # ceil(2.5) = 3
    assert topk_mean(v, 0.01) == 10.0                        # at least one
    assert topk_mean(np.arange(30.0), 0.1) == pytest.approx(28.0)   # 0.1 * 30 counts 3, not 4
    for bad in (0, 1.0, 0.0, True):
        with pytest.raises(ValueError):
            topk_mean(v, bad)
    with pytest.raises(ValueError, match="1 NaN"):
        topk_mean([1.0, np.nan], 1)
