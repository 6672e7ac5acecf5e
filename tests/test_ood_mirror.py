"""The contralateral `mirror` score and the axial smoothing of slice scores: hand-checked cases, and the score
of real slices through a seeded VQ-VAE (codebook initialised from the slices) and MVTM."""
import numpy as np
import pytest
import torch

from mimood.config import preset
from mimood.models.checkpoint import build_model
from mimood.models.graphs import encode_slices
from mimood.ood.features import FeatureGraph, mvtm_features
from mimood.ood.mirror import (mirror_distance, mirror_index, mirror_score, mirror_slices, neighbourhood_mean,
                               paired_tokens)
from mimood.ood.scan import axial_smooth, brain_share, brain_tokens


def test_mirror_slices_flip_left_right():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    m = mirror_slices(x)
    np.testing.assert_array_equal(m[:, :, 0], x[:, :, 3])
    np.testing.assert_array_equal(mirror_slices(m), x)
    assert m.flags["C_CONTIGUOUS"]


def test_mirror_distance_hand_case():
    h = np.zeros((1, 2, 3))
    hm = np.array([[[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]])
    np.testing.assert_allclose(mirror_distance(h, hm), [[5.0, 0.0]])
    # float16 features whose squares overflow float16 (300^2 > 65504)
    big = np.full((1, 1, 4), 300.0, np.float16)
    np.testing.assert_allclose(mirror_distance(big, -big), [[1200.0]])
    with pytest.raises(ValueError, match="must both be"):
        mirror_distance(h, hm[:, :1])


def test_neighbourhood_mean_hand_case():
    # 3 x 3 grid, one slice; the centre token is outside the brain mask
    s = np.arange(9, dtype=np.float64)[None]
    mask = np.ones((1, 9), bool)
    mask[0, 4] = False
    out = neighbourhood_mean(s, mask, size=3)
    # corner 0: brain neighbours 0, 1, 3 (4 is masked out) -> 4/3; centre: all 8 others -> 32/8
    assert out[0, 0] == pytest.approx((0 + 1 + 3) / 3)
    assert out[0, 4] == pytest.approx((36 - 4) / 8)
    assert out[0, 8] == pytest.approx((5 + 7 + 8) / 3)
    # no masked token in reach: the token keeps its own value
    np.testing.assert_allclose(neighbourhood_mean(s, np.zeros((1, 9), bool), size=3), s)


def test_paired_tokens_and_the_outline():
    np.testing.assert_array_equal(mirror_index(9), [2, 1, 0, 5, 4, 3, 8, 7, 6])
    with pytest.raises(ValueError, match="square"):
        mirror_index(10)
    # brain in the left two columns of a 3 x 3 grid: only the middle column is paired with brain
    mask = np.array([[1, 1, 0, 1, 1, 0, 1, 1, 0]], bool)
    np.testing.assert_array_equal(paired_tokens(mask), [[0, 1, 0, 0, 1, 0, 0, 1, 0]])
    # a large distance at an unpaired token (its mirror place is background) does not reach the score
    h, hm = np.zeros((1, 9, 2)), np.zeros((1, 9, 2))
    hm[0, 0] = [30.0, 40.0]                                        # token 0: mirror place 2 is background
    hm[0, 4] = [3.0, 4.0]                                          # token 4 (centre): paired, distance 5
    score = mirror_score(h, hm, mask)
    assert score.max() <= 5.0 and score[0, 4] == pytest.approx(5.0 / 3)   # centre: mean of the 3 paired tokens
    # no paired token in reach: 0
    np.testing.assert_array_equal(mirror_score(h, hm, np.eye(1, 9, 0, dtype=bool)), np.zeros((1, 9)))


def test_axial_smooth_hand_case():
    s = np.array([0.0, 3.0, 0.0])
    w = np.exp(-0.5)                                      # weight of a neighbour one slice away at sigma 1
    expect_mid = 3.0 / (1 + 2 * w)
    out = axial_smooth(s, np.array([0, 1, 2]), 1.0)
    assert out[1] == pytest.approx(expect_mid)
    assert out[0] == pytest.approx(3.0 * w / (1 + w + np.exp(-2.0)))
    np.testing.assert_array_equal(axial_smooth(s, np.array([0, 1, 2]), 0.0), s)
    # slices far apart (a stride or a gap) barely mix
    far = axial_smooth(s, np.array([0, 20, 40]), 1.0)
    np.testing.assert_allclose(far, s, atol=1e-12)


@pytest.fixture(scope="module")
def models():
    cfg = preset("tiny")
    torch.manual_seed(0)
    vqvae = build_model("vqvae", cfg.vqvae).train()
    with torch.no_grad():                            # data-driven codebook (training's step-1 restart), so that
        vqvae(torch.from_numpy(_slice_and_blob()[0][:, None]))     # different content gets different codes
        vqvae.restart_dead_codes()
    mvtm = build_model("mvtm", cfg.transformer).eval()
    return vqvae.eval(), FeatureGraph(mvtm, "unmasked").eval()


def _slice_and_blob():
    """A left-right symmetric brain-like slice, and the same slice with a bright blob in one hemisphere."""
    yy, xx = np.mgrid[:160, :160]
    brain = ((yy - 79.5) / 70) ** 2 + ((xx - 79.5) / 60) ** 2 <= 1
    x = np.where(brain, 0.4 + 0.2 * np.cos(yy / 9.0) * np.cos((xx - 79.5) / 7.0), 0).astype(np.float32)
    assert np.array_equal(x, x[:, ::-1])
    lesion = x.copy()
    blob = ((yy - 60) ** 2 + (xx - 45) ** 2) <= 14 ** 2          # left hemisphere, columns 31-59
    lesion[blob] = 1.0
    return np.stack([x, lesion]), brain


def test_mirror_score_of_real_slices(models):
    vqvae, graph = models
    x, brain = _slice_and_blob()
    tokens = encode_slices(vqvae, x, 2)
    mirrored = encode_slices(vqvae, mirror_slices(x), 2)
    h, hm = mvtm_features(graph, tokens), mvtm_features(graph, mirrored)
    mask = brain_tokens(brain_share(np.stack([brain, brain])), 1.0)
    score = mirror_score(h, hm, mask)                                 # [2, 400]
    # a symmetric slice is its own mirror image: zero everywhere
    np.testing.assert_array_equal(tokens[0], mirrored[0])
    assert np.all(score[0] == 0)
    # the blob (token columns 3-7, rows 5-9) and its mirror place (columns 12-16) differ from the other side
    grid = score[1].reshape(20, 20)
    r, c = np.unravel_index(np.argmax(np.where(mask[1].reshape(20, 20), grid, -1)), grid.shape)
    assert grid.max() > 0 and 3 <= r <= 11 and (1 <= c <= 9 or 10 <= c <= 18)
    assert grid[3:12, 1:9].mean() > grid[14:18, 1:19].mean()       # near the blob vs far below it
