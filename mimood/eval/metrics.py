"""Evaluation metrics: pixel-level Dice/AP/AUROC, token-level AP/AUROC, scan-level detection.

Conventions used everywhere in this file:
- scores: higher = more anomalous; labels: True/1 = anomalous (lesion pixel, lesion token, lesion scan).
- A prediction at threshold t is `score >= t`.
- Ties: all samples with the same score are always on the same side of a threshold (no tie-breaking by order).
- NaN (or infinite) scores raise ValueError: a silent NaN would otherwise be ranked arbitrarily by the sort.
- If the labels hold a single class, AUROC, AP and the best Dice are undefined and returned as NaN
  (a test set without lesions or without healthy samples has no ranking to score).

Pooled pixel metrics run on tens of millions of voxels, so all three curve metrics (best Dice, AP, AUROC)
come from ONE call to sklearn's `roc_curve` (one sort) instead of three (`precision_recall_curve`,
`average_precision_score`, `roc_auc_score` each sort again). The AP and AUROC sums below are the exact
formulas sklearn uses; tests check them against sklearn. About 6 s and 1.3 GB per 2e7 float32 scores.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import auc, roc_curve

from mimood.config import DOWNSAMPLE
from mimood.ood.scan import topk_mean  # noqa: F401  (its home is the scoring room; re-exported for eval callers)


def _scores_labels(scores, labels, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Flatten (and mask) scores and labels; validate shapes, labels in {0,1} and finite scores."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != scores.shape:
            raise ValueError(f"mask {mask.shape} and scores {scores.shape} differ in shape")
        scores, labels = scores[mask], labels[mask]
    scores, labels = scores.ravel(), labels.ravel()
    if scores.size == 0:
        raise ValueError("no scores to evaluate (empty input or empty mask)")
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must be boolean or 0/1")
        labels = labels.astype(bool)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    n_nan = int(np.isnan(scores).sum())
    n_inf = int(np.isinf(scores).sum())
    if n_nan or n_inf:
        raise ValueError(f"scores contain {n_nan} NaN and {n_inf} infinite values (of {scores.size})")
    return scores, labels


def _curve(scores: np.ndarray, labels: np.ndarray):
    """Counts at every distinct threshold, highest first: (tps [T], fps [T], thresholds [T], P, N).

    Point i predicts `score >= thresholds[i]`; tps/fps are exact integers (float64) recovered from sklearn's
    rates. The first point (threshold +inf) predicts nothing. Returns None if labels hold one class.
    """
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    tps = np.rint(tpr * n_pos)
    fps = np.rint(fpr * n_neg)
    return tps, fps, thresholds, n_pos, n_neg


def _auroc(tps, fps, n_pos, n_neg) -> float:
    """Trapezoidal area under the full ROC curve (= sklearn roc_auc_score; ties count one half)."""
    return float(auc(fps / n_neg, tps / n_pos))


def _ap(tps, fps, n_pos) -> float:
    """Average precision sum_i (R_i - R_{i-1}) P_i, no interpolation (= sklearn average_precision_score)."""
    tps, fps = tps[1:], fps[1:]             # drop the +inf point: it predicts nothing, precision 0/0
    precision = tps / (tps + fps)
    recall_step = np.diff(tps, prepend=0.0) / n_pos
    return float(np.sum(recall_step * precision))


def _best_dice(tps, fps, thresholds, n_pos) -> tuple[float, float]:
    """Max over thresholds of Dice = F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P)."""
    tps, fps, thresholds = tps[1:], fps[1:], thresholds[1:]
    dice = 2.0 * tps / (tps + fps + n_pos)   # denominator >= P > 0, so no NaN
    i = int(np.argmax(dice))                 # first maximum = highest threshold reaching it
    return float(dice[i]), float(thresholds[i])


def best_dice(scores, labels) -> tuple[float, float]:
    """[DICE] of the paper: the best Dice over all thresholds, and the threshold reaching it.

    Dice at threshold t is 2PR/(P+R) (the F1 score) of the prediction `scores >= t`. The threshold returned is
    the highest one reaching the maximum (a score value from the input). (NaN, NaN) if labels hold one class.
    """
    curve = _curve(*_scores_labels(scores, labels))
    if curve is None:
        return math.nan, math.nan
    tps, fps, thresholds, n_pos, _ = curve
    return _best_dice(tps, fps, thresholds, n_pos)


def dice(pred, labels) -> float:
    """Dice 2|A∩B| / (|A|+|B|) of two boolean masks; 1.0 if both are empty (nothing to find, nothing found)."""
    pred = np.asarray(pred, dtype=bool)
    labels = np.asarray(labels, dtype=bool)
    if pred.shape != labels.shape:
        raise ValueError(f"pred {pred.shape} and labels {labels.shape} differ in shape")
    total = int(pred.sum()) + int(labels.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, labels).sum()) / total


def pixel_metrics(scores, labels, mask=None) -> dict[str, float]:
    """Pixel-level metrics pooled over all pixels (inside `mask`, e.g. the brain, if given).

    Returns {"dice", "threshold", "ap", "auroc"}: best Dice and its threshold (see best_dice), average
    precision and AUROC. All NaN if the (masked) labels hold one class.
    """
    curve = _curve(*_scores_labels(scores, labels, mask))
    if curve is None:
        return {"dice": math.nan, "threshold": math.nan, "ap": math.nan, "auroc": math.nan}
    tps, fps, thresholds, n_pos, n_neg = curve
    d, t = _best_dice(tps, fps, thresholds, n_pos)
    return {"dice": d, "threshold": t, "ap": _ap(tps, fps, n_pos), "auroc": _auroc(tps, fps, n_pos, n_neg)}


def token_labels(labels_2d, factor: int = DOWNSAMPLE, rule: str = "any") -> np.ndarray:
    """Ground truth on the token grid: [S, H, W] bool -> [S, H/factor, W/factor] bool.

    Each token covers a factor x factor block of pixels. rule="any": the token is anomalous if any of its pixels
    is; rule="majority": if strictly more than half of its pixels are.
    """
    labels_2d = np.asarray(labels_2d, dtype=bool)
    if labels_2d.ndim != 3:
        raise ValueError(f"labels_2d must be [S, H, W], got shape {labels_2d.shape}")
    s, h, w = labels_2d.shape
    if h % factor or w % factor:
        raise ValueError(f"H={h} and W={w} must be multiples of factor={factor}")
    blocks = labels_2d.reshape(s, h // factor, factor, w // factor, factor)   # [S, h, f, w, f]
    if rule == "any":
        return blocks.any(axis=(2, 4))
    if rule == "majority":
        return blocks.sum(axis=(2, 4)) * 2 > factor * factor
    raise ValueError(f"rule must be 'any' or 'majority', got {rule!r}")


def token_metrics(scores, token_gt, mask=None) -> dict[str, float]:
    """Token-level {"ap", "auroc"} pooled over all tokens [S, h, w] (inside `mask`, e.g. foreground tokens).

    NaN if the (masked) token labels hold one class.
    """
    curve = _curve(*_scores_labels(scores, token_gt, mask))
    if curve is None:
        return {"ap": math.nan, "auroc": math.nan}
    tps, fps, _, n_pos, n_neg = curve
    return {"ap": _ap(tps, fps, n_pos), "auroc": _auroc(tps, fps, n_pos, n_neg)}


def detection_metrics(scores, is_anomalous) -> dict[str, float]:
    """Scan- or slice-level detection: {"auroc", "aupr", "fpr95"}, anomalous = positive class.

    aupr is the average precision with anomalous samples as positives.
    fpr95 (MOODv2's FPR at 95% TPR, with anomalies as the positives): the threshold t is the highest score
    such that at least 95% of anomalous samples have score >= t (t = the ceil(0.95 P)-th highest anomalous
    score); fpr95 = the share of normal samples with score >= t (ties count as false positives). In words:
    the share of healthy samples flagged when the detector catches 95% of the anomalous ones.
    All NaN if one class is missing.
    """
    scores, labels = _scores_labels(scores, is_anomalous)
    curve = _curve(scores, labels)
    if curve is None:
        return {"auroc": math.nan, "aupr": math.nan, "fpr95": math.nan}
    tps, fps, _, n_pos, n_neg = curve
    need = (95 * n_pos + 99) // 100                        # ceil(0.95 P) in integers, no float rounding
    t = np.sort(scores[labels])[::-1][need - 1]
    fpr95 = float(np.count_nonzero(scores[~labels] >= t)) / n_neg
    return {"auroc": _auroc(tps, fps, n_pos, n_neg), "aupr": _ap(tps, fps, n_pos), "fpr95": fpr95}


def json_ready(obj):
    """Plain Python types for strict JSON: NaN (a metric with one class missing) as None, numpy scalars as
    floats/ints, keys as strings."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
