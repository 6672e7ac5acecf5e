"""The [0, 1] scan score against healthy reference scores: monotone, what it means at the references, and z /
percentile only with enough reference scans."""
import math

import numpy as np
import pytest

from mimood.runtime.reference import MIN_REFERENCE, HealthyReference, format_score

RNG = np.random.default_rng(0)


def test_strictly_increasing_in_the_raw_score_even_far_beyond_the_references():
    ref = HealthyReference(RNG.normal(8.5, 0.3, 24), name="ood.mirror")
    raw = np.concatenate([np.linspace(0, 20, 4001), [1e3, 1e6]])
    score = ref.calibrate(raw)
    assert np.all(np.diff(score) > 0)
    assert 0 < score.min() and score.max() < 1


def test_ties_in_the_reference_and_constant_references():
    ref = HealthyReference([1.0, 2.0, 2.0, 2.0, 3.0])
    assert ref.calibrate(2.0) == pytest.approx((1 + 0.5 * 3) / 5)           # below + half the equal ones
    assert np.all(np.diff(ref.calibrate(np.linspace(0, 4, 401))) > 0)
    same = HealthyReference([5.0] * 3)
    assert same.calibrate(5.0) == 0.5 and same.calibrate(4.9) < 0.5 < same.calibrate(5.1)


def test_at_the_references_it_is_the_share_below():
    scores = np.arange(20.0)                                                   # 0, 1, ..., 19
    ref = HealthyReference(RNG.permutation(scores))
    for k in (0, 7, 19):
        assert ref.calibrate(float(k)) == pytest.approx((k + 0.5) / 20)
        assert ref.share_below(float(k)) == k / 20
    assert ref.calibrate(7.5) == pytest.approx(0.4)                           # linear between neighbours
    assert isinstance(ref.calibrate(3.0), float)


def test_z_and_percentile_need_enough_reference_scans():
    few = HealthyReference([8.0, 9.0], name="ood.mirror").report(9.5)
    assert few["z"] is None and few["percentile"] is None
    assert str(MIN_REFERENCE) in few["omitted"] and "2" in few["omitted"]
    assert 0 < few["score"] < 1 and few["reference_scans"] == 2

    values = RNG.normal(0, 1, MIN_REFERENCE)
    full = HealthyReference(values).report(1.5)
    assert full["omitted"] == ""
    assert full["z"] == pytest.approx((1.5 - values.mean()) / values.std(ddof=1))
    assert full["percentile"] == pytest.approx(100 * (values <= 1.5).mean())
    assert math.isfinite(HealthyReference(values).summary()["std"])


def test_bad_references_are_refused():
    with pytest.raises(ValueError, match="no healthy reference"):
        HealthyReference([])
    with pytest.raises(ValueError, match="NaN"):
        HealthyReference([1.0, float("nan")])
    with pytest.raises(ValueError, match="not finite"):
        HealthyReference([1.0, 2.0]).calibrate(float("inf"))


def test_format_never_rounds_to_certainty():
    assert format_score(0.97312) == "0.973" and format_score(1.0) == "1.000" and format_score(0.0) == "0.000"
    assert format_score(0.99996) == "> 0.999" and format_score(2e-5) == "< 0.001"
