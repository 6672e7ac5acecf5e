"""A raw scan score -> a score in [0, 1] against healthy reference scans (numpy only, no torch).

The raw scan scores of mimood (an OOD score such as `ood.mirror`, or the anomaly-map score) are unbounded and
their scale depends on the model; the MOOD challenge evaluator clips scan scores to [0, 1], and a reader wants to
know how a scan compares with healthy ones. `HealthyReference.calibrate` answers that: the share of healthy
reference scans that score below the raw score.

    ref = HealthyReference([...raw scores of healthy reference scans...], name="ood.mirror")
    ref.calibrate(raw)          # in [0, 1], strictly increasing in raw
    ref.report(raw)             # {"raw", "score", "z", "percentile", "reference_scans", "omitted"}

`calibrate`, exactly:
- at a reference score u: (#references below u + half the #references equal to u) / n (mid-rank ECDF);
- between two neighbouring reference scores: linear between their values;
- below the lowest (above the highest) reference u: p(u) / (1 + (u - raw) / s) (1 - (1 - p(u)) / (1 + (raw - u) / s)),
  with s the references' standard deviation: a slow tail that approaches 0 (1) without reaching it, so scans
  beyond every reference keep their order even far out (a plain share would give all of them the same 1.0, and
  the MOOD evaluator's average precision would see ties; an exponential tail reaches 1.0 in float64 at ~37 s).
So with 20 references a raw score at the highest one gets 0.975, and 0.99 means well beyond all of them.

The z-score and the percentile are given only with at least MIN_REFERENCE (20) reference scans; with fewer they
are None and `omitted` says why (with 2 reference scans a percentile is one of 0, 50 or 100 and says nothing).
"""
from __future__ import annotations

import math
import numpy as np

MIN_REFERENCE = 20         # reference scans needed for a z-score and a percentile

SCORE_COLUMNS: dict[str, tuple[str, str]] = {          # report.csv column -> (unit, description)
    "scan_score": ("share in [0, 1]", "calibrated scan score: the share of healthy reference scans scoring below "
                                      "the raw score (ties half), interpolated; 0.5 = a typical healthy scan"),
    "raw_score": ("score_name's own", "the raw scan score before calibration (unbounded; higher = more anomalous)"),
    "reference_scans": ("count", "healthy reference scans the calibration uses"),
}


class HealthyReference:
    """Sorted raw scan scores of healthy reference scans (any order in, at least one) and their score's name."""

    def __init__(self, scores, name: str = ""):
        values = np.sort(np.asarray(list(scores), dtype=np.float64).ravel())
        if values.size == 0:
            raise ValueError("no healthy reference scores: a scan score cannot be calibrated without them")
        if not np.isfinite(values).all():
            raise ValueError(f"healthy reference scores of {name or 'the score'} contain NaN or Inf")
        self.scores, self.name = values, name                              # [n] ascending
        self._u, counts = np.unique(values, return_counts=True)            # [m] unique reference scores
        below = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._p = (below + 0.5 * counts) / values.size                     # [m] mid-rank share at each

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def scale(self) -> float:
        """The tails' length scale: the references' standard deviation (ddof 1); with no spread (one reference,
        or all equal) 1% of their magnitude, or 1."""
        s = float(np.std(self.scores, ddof=1)) if self.n >= 2 else 0.0
        if s > 0:
            return s
        m = abs(float(self._u[0]))
        return 0.01 * m if m > 0 else 1.0

    def calibrate(self, raw) -> np.ndarray | float:
        """Raw score(s) -> [0, 1], strictly increasing (module docstring); a float for a float."""
        x = np.asarray(raw, dtype=np.float64)
        if not np.isfinite(x).all():
            raise ValueError(f"raw {self.name or 'scan'} score is not finite: {raw}")
        u, p, s = self._u, self._p, self.scale
        below = p[0] / (1 + np.maximum(u[0] - x, 0) / s)
        above = 1 - (1 - p[-1]) / (1 + np.maximum(x - u[-1], 0) / s)
        out = np.where(x < u[0], below, np.where(x > u[-1], above, np.interp(x, u, p)))
        return float(out) if out.ndim == 0 else out

    def share_below(self, raw: float) -> float:
        """The plain share of reference scores strictly below `raw` (a step function; `calibrate` smooths it)."""
        return float(np.searchsorted(self.scores, raw, side="left")) / self.n

    def report(self, raw: float) -> dict:
        """Everything a report row or provenance.json gives about one scan's score (plain JSON)."""
        raw = float(raw)
        out = {"name": self.name, "raw": raw, "score": self.calibrate(raw), "reference_scans": self.n,
               "z": None, "percentile": None, "omitted": ""}
        ref = self.scores
        std = float(ref.std(ddof=1)) if self.n >= 2 else 0.0
        if self.n < MIN_REFERENCE:
            out["omitted"] = (f"z-score and percentile need at least {MIN_REFERENCE} healthy reference scans, "
                              f"this reference has {self.n}")
        elif std == 0:
            out["omitted"] = "z-score and percentile omitted: the healthy reference scores have no spread"
        else:
            out["z"] = (raw - float(ref.mean())) / std
            out["percentile"] = 100.0 * float((ref <= raw).mean())
        return out

    def summary(self) -> dict:
        """What a manifest or provenance.json should record about the reference (plain JSON)."""
        s = self.scores
        return {"name": self.name, "n": self.n, "min": float(s[0]), "median": float(np.median(s)),
                "max": float(s[-1]), "mean": float(s.mean()),
                "std": float(s.std(ddof=1)) if self.n >= 2 else math.nan}


def format_score(score: float, digits: int = 3) -> str:
    """A [0, 1] score for people: `digits` decimals, but never "1.000" / "0.000" for a score that is not exactly
    that (scans beyond every reference get 0.9999...: "> 0.999")."""
    text = f"{score:.{digits}f}"
    if float(text) == 1 and score < 1:
        return "> " + f"{1 - 10 ** -digits:.{digits}f}"
    if float(text) == 0 and score > 0:
        return "< " + f"{10 ** -digits:.{digits}f}"
    return text
