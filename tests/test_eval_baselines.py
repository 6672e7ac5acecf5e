"""The baselines: AR restoration (reference == fast), the MVTM likelihood, inverse-CDF sampling, intensity tokens."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimood.config import GRID, NUM_TOKENS, preset
from mimood.eval.baselines import MVTMLikelihood, ar_nll, ar_restore, ar_restore_reference, sample_inverse_cdf
from mimood.models.transformer import TokenTransformer
from mimood.restore import intensity_token_scores

CFG = preset("tiny")
K = CFG.vqvae.num_embeddings


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {t: TokenTransformer(CFG.transformer, t).eval() for t in ("mvtm", "ar")}


def test_sample_inverse_cdf_hand_case():
    probs = torch.tensor([[0.2, 0.5, 0.3]] * 5)
    u = torch.tensor([0.1, 0.2, 0.25, 0.95, 0.9999999])
    # cdf = 0.2, 0.7, 1.0: the first code whose cdf reaches u
    assert sample_inverse_cdf(probs, u).tolist() == [0, 0, 1, 2, 2]
    # a cdf that rounds below u never yields an id past the vocabulary
    assert sample_inverse_cdf(torch.tensor([[0.5, 0.4999]]), torch.tensor([0.99995])).item() == 1


def test_ar_nll_is_the_teacher_forced_cross_entropy(models):
    tok = torch.randint(0, K, (2, NUM_TOKENS), generator=torch.Generator().manual_seed(0)).int()
    nll = ar_nll(models["ar"], tok)
    with torch.no_grad():
        # position 5 sees [BOS] t0..t4 only: changing t5 onwards leaves its distribution alone
        alt = tok.clone()
        alt[:, 5:] = (alt[:, 5:] + 1) % K
        logp = F.log_softmax(models["ar"](alt).float(), -1)[:, 5]
    assert torch.allclose(nll[:, 5], -logp.gather(1, tok[:, 5:6].long())[:, 0], atol=1e-5)


@pytest.mark.parametrize("lam_nll", [math.log(K) - 0.02, 50.0])
def test_ar_fast_restoration_equals_the_reference(models, lam_nll):
    # the first 64 raster positions only (the model is causal, any prefix length works): the reference costs
    # one pass per position
    n = 64
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, K, (3, n), generator=g).int()
    noise = torch.rand(3, n, generator=g)
    ref = ar_restore_reference(models["ar"], tok, noise, lam_nll)
    fast, passes = ar_restore(models["ar"], tok, noise, lam_nll)
    assert torch.equal(ref, fast)
    changed = (fast != tok).sum(1)
    if lam_nll > 10:                                           # nothing is that unlikely: one pass, no change
        assert passes == 1 and changed.sum() == 0
    else:                                                      # an untrained model: NLL ~ log K, many flagged
        assert changed.min() > 5
        # a row needs a pass per resampled token (redrawing the same id still counts) plus the final check
        assert int(changed.max()) + 1 <= passes <= n + 1


def test_mvtm_likelihood_matches_masking_each_lattice_cell(models):
    mvtm = models["mvtm"]
    det = MVTMLikelihood(mvtm, stride=2)
    masks = det.masks.numpy()
    assert masks.shape == (4, NUM_TOKENS) and (masks.sum(0) == 1).all()       # every token scored once
    grid = masks.reshape(4, GRID, GRID)
    assert not (grid[:, :, 1:] & grid[:, :, :-1]).any() and not (grid[:, 1:] & grid[:, :-1]).any()
    assert not (grid[:, 1:, 1:] & grid[:, :-1, :-1]).any()                   # no neighbour masked with a token
    tok = torch.randint(0, K, (2, NUM_TOKENS), generator=torch.Generator().manual_seed(3)).int()
    with torch.no_grad():
        nll = det(tok)
        for i in (0, 21, 399):                                  # cells (0,0), (1,1), (1,1) of the 2 x 2 lattice
            r, c = divmod(i, GRID)
            cell = torch.tensor([(rr % 2, cc % 2) == (r % 2, c % 2) for rr in range(GRID) for cc in range(GRID)])
            logp = F.log_softmax(mvtm(torch.where(cell, torch.full_like(tok, K), tok)).float(), -1)
            assert torch.allclose(nll[:, i], -logp[:, i].gather(1, tok[:, i:i + 1].long())[:, 0], atol=1e-5)
    assert nll.dtype == torch.float32 and (nll > 0).all()


def test_intensity_token_scores_are_block_means():
    x = np.zeros((1, 1, 160, 160), np.float32)
    x[0, 0, :8, :8] = 1.0                                       # token 0 fully bright
    x[0, 0, 8:12, 8:16] = 0.5                                   # token 21: half of it at 0.5 -> 0.25
    s = intensity_token_scores(x)
    assert s.shape == (1, NUM_TOKENS)
    assert s[0, 0] == 1.0 and s[0, 21] == pytest.approx(0.25) and s[0, 1] == 0.0 and s.sum() == pytest.approx(1.25)
