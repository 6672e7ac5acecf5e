"""MOODv2-style OOD scores against hand-computed small cases."""
import math

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mimood.ood.scores import (energy_score, fit_knn, fit_mahalanobis, fit_vim, knn_score,
                               mahalanobis_score, max_logit_score, nll_score, residual_score,
                               stats_from_tensors, stats_to_tensors, vim_score)


def _vim_case():
    """Fit points u0 +- s_i q_i with an orthonormal basis Q and s = 4, 3, 2, 1.

    The covariance about u0 is Q diag(s^2 / 4) Q^T exactly, so with D = 2 the principal subspace is
    span(q0, q1). Head W = [Q^T; 1^T Q^T], b = -W u0: u = u0 and logits(u0 + v) = [Q^T v, sum(Q^T v)].
    """
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    u0 = rng.normal(size=4)
    s = np.array([4.0, 3.0, 2.0, 1.0])
    h = np.concatenate([u0 + s[:, None] * Q.T, u0 - s[:, None] * Q.T])      # [8, 4]
    W = np.vstack([Q.T, Q.T.sum(axis=0)])                                   # [5, 4]
    b = -W @ u0
    return h, W, b, Q, u0


def test_vim_geometry_and_alpha():
    h, W, b, Q, u0 = _vim_case()
    stats = fit_vim(h, W, b, dim=2)
    np.testing.assert_allclose(stats.u, u0, atol=1e-12)
    assert stats.R.shape == (4, 2) and stats.D == 2
    # on the principal subspace through u: zero residual
    on_plane = np.stack([u0 + 2 * Q[:, 0] - 3 * Q[:, 1], u0])
    np.testing.assert_allclose(residual_score(on_plane, stats), 0.0, atol=1e-12)
    # along discarded eigenvectors: the length of the off-plane part
    off = np.stack([u0 + 1.5 * Q[:, 3], u0 + 5 * Q[:, 0] + 3 * Q[:, 2] - 4 * Q[:, 3]])
    np.testing.assert_allclose(residual_score(off, stats), [1.5, 5.0], atol=1e-12)
    # +s_i q_i has max logit s_i, -s_i q_i has max logit 0: mean 10/8; residuals 0,0,2,1 twice: mean 6/8
    assert stats.alpha == pytest.approx(10 / 6, rel=1e-12)
    # u0 + 1.5 q3: logits [0, 0, 0, 1.5, 1.5]
    x = (u0 + 1.5 * Q[:, 3])[None]
    logits = x @ W.T + b
    expected = 10 / 6 * 1.5 - math.log(3 + 2 * math.exp(1.5))
    assert vim_score(x, logits, stats)[0] == pytest.approx(expected, rel=1e-12)


def test_vim_default_dim_and_bad_dim():
    h, W, b, _, _ = _vim_case()
    assert fit_vim(h, W, b).D == 2
    with pytest.raises(ValueError, match="dim"):
        fit_vim(h, W, b, dim=4)
    with pytest.raises(ValueError, match="alpha"):
        fit_vim(h, W, b - 100.0, dim=2)        # all logits negative: alpha would be negative


def test_fits_are_deterministic():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3000, 16)).astype(np.float32)
    W, b = rng.normal(size=(32, 16)), rng.normal(size=32) + 5
    codes = rng.integers(0, 32, size=3000)
    a, c = fit_vim(h, W, b), fit_vim(h, W, b)
    assert np.array_equal(a.u, c.u) and np.array_equal(a.R, c.R) and a.alpha == c.alpha
    m1, m2 = fit_mahalanobis(h, codes, 32), fit_mahalanobis(h, codes, 32)
    assert np.array_equal(m1.means, m2.means) and np.array_equal(m1.precision, m2.precision)


def test_float16_features_do_not_overflow():
    rng = np.random.default_rng(0)
    h16 = (300 + 50 * rng.normal(size=(500, 8))).astype(np.float16)    # squares ~1e5 > float16 max
    h64 = h16.astype(np.float64)
    W, b = rng.normal(size=(16, 8)), rng.normal(size=16)
    W[:, 0] = np.abs(W[:, 0]) / 10                  # keep max logits positive (alpha > 0)
    stats = fit_vim(h16, W, b, dim=3)
    ref = fit_vim(h64, W, b, dim=3)
    assert np.array_equal(stats.R, ref.R) and stats.alpha == ref.alpha
    r = residual_score(h16, stats)
    assert np.isfinite(r).all() and r.max() > 100
    np.testing.assert_array_equal(r, residual_score(h64, stats))
    codes = rng.integers(0, 4, size=500)
    ms = fit_mahalanobis(h16, codes, 4)
    np.testing.assert_array_equal(mahalanobis_score(h16, codes, ms), mahalanobis_score(h64, codes, ms))
    big = np.array([[60000.0, 60000.0]], dtype=np.float16)
    assert energy_score(big)[0] == pytest.approx(-(60000 + math.log(2)))


def _maha_case():
    """Code 0: 4 points (0,0) +- (2,0), +- (0,1); code 1: the same pattern twice around (4,2); code 2 unseen.

    Within-code scatter: code 0 diag(8, 2), code 1 diag(16, 4); over n = 12: covariance diag(2, 0.5).
    Global mean mu = (4*(0,0) + 8*(4,2)) / 12 = (8/3, 4/3).
    """
    pattern = np.array([[2.0, 0], [-2, 0], [0, 1], [0, -1]])
    h = np.concatenate([pattern, pattern + [4, 2], pattern + [4, 2]])
    codes = np.array([0] * 4 + [1] * 8)
    return h, codes


def test_mahalanobis_diagonal_hand_case():
    h, codes = _maha_case()
    stats = fit_mahalanobis(h, codes, num_codes=3, tau=0.0)
    np.testing.assert_allclose(stats.means, [[0, 0], [4, 2], [8 / 3, 4 / 3]], atol=1e-12)
    # precision = diag(1/2, 2) up to the 1e-6 * tr/d ridge
    np.testing.assert_allclose(stats.precision, np.diag([0.5, 2.0]), rtol=1e-5)
    x = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 0.0], [8 / 3, 4 / 3]])
    got = mahalanobis_score(x, np.array([0, 0, 1, 2]), stats)
    # code mean -> 0; (1,1) from (0,0): 1/2 + 2 = 2.5; (5,0) from (4,2): 1/2 + 4*2 = 8.5; unseen code -> mu
    np.testing.assert_allclose(got, [0.0, 2.5, 8.5, 0.0], rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="codes"):
        mahalanobis_score(x, np.array([0, 0, 1, 3]), stats)


def test_mahalanobis_shrinkage():
    h, codes = _maha_case()
    stats = fit_mahalanobis(h, codes, num_codes=3, tau=4.0)
    mu = np.array([8 / 3, 4 / 3])
    # (n_k mu_k + tau mu) / (n_k + tau): code 0 (n=4) moves halfway, code 1 (n=8) a third of the way
    np.testing.assert_allclose(stats.means[0], (4 * np.zeros(2) + 4 * mu) / 8, atol=1e-12)
    np.testing.assert_allclose(stats.means[0], [4 / 3, 2 / 3], atol=1e-12)
    np.testing.assert_allclose(stats.means[1], [32 / 9, 16 / 9], atol=1e-12)
    np.testing.assert_allclose(stats.means[2], mu, atol=1e-12)
    # the covariance is centred on the raw code means: unchanged by tau
    np.testing.assert_allclose(stats.precision, np.diag([0.5, 2.0]), rtol=1e-5)


def test_fits_across_chunk_boundaries():
    """n > one 65536-row chunk: the chunked float64 sums equal a one-shot computation."""
    rng = np.random.default_rng(0)
    n, d = 70000, 6
    h = rng.normal(size=(n, d)) * [3, 2, 1, 0.5, 0.2, 0.1] + 1
    codes = rng.integers(0, 3, size=n)
    stats = fit_mahalanobis(h, codes, 3, tau=0.0)
    centred = h - np.stack([h[codes == k].mean(0) for k in range(3)])[codes]
    cov = centred.T @ centred / n
    ridged = cov + 1e-6 * np.trace(cov) / d * np.eye(d)
    np.testing.assert_allclose(stats.precision, np.linalg.inv(ridged), rtol=1e-9, atol=1e-12)
    W, b = np.eye(d), -np.ones(d)                   # u = (1, ..., 1)
    vim = fit_vim(h, W, b, dim=2)
    np.testing.assert_allclose(vim.u, 1.0, atol=1e-12)
    _, vecs = np.linalg.eigh((h - 1).T @ (h - 1) / n)              # one-shot, ascending eigenvalues
    np.testing.assert_allclose(residual_score(h, vim), np.linalg.norm((h - 1) @ vecs[:, :4], axis=1), rtol=1e-9)


def test_knn_toy_bank():
    angles = np.deg2rad([0, 90, 180, 270])
    bank = 3 * np.stack([np.cos(angles), np.sin(angles)], axis=1)        # scale is normalised away
    stats = fit_knn(bank, k=1)
    np.testing.assert_allclose(np.linalg.norm(stats.bank, axis=1), 1.0, atol=1e-7)
    q = np.array([[1.0, 0.0], [1.0, 1.0]])
    near45 = 2 * math.sin(math.radians(22.5))                            # chord of 45 degrees
    np.testing.assert_allclose(knn_score(q, stats), [0.0, near45], atol=1e-7)
    np.testing.assert_allclose(knn_score(q, stats, exclude_self=True), [math.sqrt(2), near45], atol=1e-7)
    stats3 = fit_knn(bank, k=3)
    np.testing.assert_allclose(knn_score(q, stats3), [math.sqrt(2), 2 * math.sin(math.radians(67.5))],
                               atol=1e-7)
    # self-scoring the bank with exclude_self: every vector's next neighbour is 90 degrees away
    np.testing.assert_allclose(knn_score(bank, fit_knn(bank, k=1), exclude_self=True), math.sqrt(2), atol=1e-7)
    with pytest.raises(ValueError, match="zero"):
        knn_score(np.zeros((1, 2)), stats)
    with pytest.raises(ValueError, match="k must"):
        fit_knn(bank, k=5)


def test_knn_position_window():
    """With bins, a query only sees bank slices within one bin of its own; too few of them: the whole bank."""
    angles = np.deg2rad([0, 90, 180, 270])
    bank = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    stats = fit_knn(bank, k=1, bins=[0, 5, 5, 9])
    q = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    # query 0 in bin 0 sees the 0-degree vector; in bin 4 only the 90/180-degree ones; query 2 in bin 8 sees 270
    np.testing.assert_allclose(knn_score(q, stats, bins=[0, 4, 8]), [0.0, math.sqrt(2), 0.0], atol=1e-7)
    np.testing.assert_allclose(knn_score(q, stats), [0.0, 0.0, 0.0], atol=1e-7)      # no bins: whole bank
    three = fit_knn(bank, k=3, bins=[0, 5, 5, 9])
    np.testing.assert_allclose(knn_score(q[:1], three, bins=[2]), [math.sqrt(2)], atol=1e-7)   # fallback
    with pytest.raises(ValueError, match="bins"):
        fit_knn(bank, k=1, bins=[0, 1])


def test_logit_scores_hand_case():
    logits = np.array([[0.0, math.log(3.0)], [2.0, 2.0]])
    np.testing.assert_allclose(energy_score(logits), [-math.log(4), -(2 + math.log(2))], rtol=1e-12)
    np.testing.assert_allclose(max_logit_score(logits), [-math.log(3), -2.0], rtol=1e-12)
    np.testing.assert_allclose(nll_score(logits, np.array([0, 1])), [math.log(4), math.log(2)], rtol=1e-12)
    np.testing.assert_allclose(nll_score(logits, np.array([1, 0])),
                               [math.log(4) - math.log(3), math.log(2)], rtol=1e-12)
    grid = np.zeros((2, 3, 5))                                            # [S, N, K]: shape is kept
    assert energy_score(grid).shape == (2, 3)
    np.testing.assert_allclose(nll_score(grid, np.zeros((2, 3), int)), math.log(5), rtol=1e-12)
    with pytest.raises(ValueError, match="codes"):
        nll_score(logits, np.array([0, 2]))


def test_stats_roundtrip_through_safetensors(tmp_path):
    h, W, b, _, _ = _vim_case()
    hm, codes = _maha_case()
    stats = {"vim": fit_vim(h, W, b, dim=2), "maha": fit_mahalanobis(hm, codes, 3), "knn": fit_knn(h, k=2)}
    path = tmp_path / "ood_stats.safetensors"
    save_file(stats_to_tensors(stats), str(path))
    back = stats_from_tensors(load_file(str(path)))
    assert set(back) == {"vim", "maha", "knn"}
    assert isinstance(back["vim"].alpha, float) and back["vim"].D == 2 and back["knn"].k == 2
    np.testing.assert_array_equal(vim_score(h, h @ W.T + b, back["vim"]), vim_score(h, h @ W.T + b, stats["vim"]))
    np.testing.assert_array_equal(mahalanobis_score(hm, codes, back["maha"]),
                                  mahalanobis_score(hm, codes, stats["maha"]))
    np.testing.assert_array_equal(back["knn"].bank, stats["knn"].bank)
    with pytest.raises(ValueError, match="'/'"):
        stats_to_tensors({"a/b": stats["knn"]})
