"""The models as modules: shapes, causality, masks, corruption targets, the loop's graph modules."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from mimood.config import GRID, NUM_TOKENS, MaskConfig, preset
from mimood.models.graphs import DecodeScore, EncodeGraph, MVTMStep
from mimood.models.masks import atd_masks, brush_mask, brush_stroke, corrupt, mvtm_masks
from mimood.models.transformer import TokenTransformer
from mimood.models.vqvae import VQVAE, codebook_stats

CFG = preset("tiny")
K = CFG.vqvae.num_embeddings


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {t: TokenTransformer(CFG.transformer, t).eval() for t in ("mvtm", "atd", "ar")}


def test_transformer_shapes_and_features(models):
    tok = torch.randint(0, K, (3, NUM_TOKENS))
    assert models["mvtm"](tok).shape == (3, NUM_TOKENS, K)
    assert models["ar"](tok).shape == (3, NUM_TOKENS, K)
    assert models["atd"](tok).shape == (3, NUM_TOKENS)
    m = models["mvtm"]
    assert torch.allclose(m.head(m.features(tok)), m(tok), atol=1e-6)
    # [MASK] is a valid input for the MVTM
    assert torch.isfinite(m(torch.full((1, NUM_TOKENS), m.mask_id))).all()


def test_ar_is_causal_and_mvtm_is_not(models):
    tok = torch.randint(0, K, (1, NUM_TOKENS))
    j = 150
    tok2 = tok.clone()
    tok2[0, j] = (tok[0, j] + 1) % K
    with torch.no_grad():
        a, b = models["ar"](tok), models["ar"](tok2)
        # position i predicts token i from tokens < i: positions <= j cannot see token j
        assert torch.equal(a[0, : j + 1], b[0, : j + 1])
        assert not torch.allclose(a[0, j + 1:], b[0, j + 1:])
        m1, m2 = models["mvtm"](tok), models["mvtm"](tok2)
        assert not torch.allclose(m1[0, :j], m2[0, :j])


def test_brush_masks_are_connected_strokes_within_coverage():
    cfg = MaskConfig()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        lo, hi = sorted(rng.uniform(0.02, 0.6, 2))
        m = brush_mask(rng, GRID, cfg, coverage=(lo, hi))
        share = m.mean()
        assert share <= hi + 1e-9
        assert share >= min(lo, 1.0) - 1e-9
        _, n_components = ndimage.label(m, structure=np.ones((3, 3)))
        assert 1 <= n_components <= cfg.max_strokes + 2
    # every stroke of the brush is one 8-connected component
    for seed in range(20):
        rng = np.random.default_rng(seed)
        stroke = np.logical_or.reduce(list(brush_stroke(rng, GRID, cfg, (1, 4))))
        _, n = ndimage.label(stroke, structure=np.ones((3, 3)))
        assert n == 1


def test_mvtm_and_atd_mask_batches():
    rng = np.random.default_rng(0)
    m = mvtm_masks(rng, 64, GRID, MaskConfig())
    assert m.shape == (64, NUM_TOKENS) and m.dtype == torch.bool
    assert (m.sum(1) >= 1).all()
    shares = m.float().mean(1)
    assert shares.min() < 0.3 and shares.max() > 0.7          # the cosine schedule spans low and high ratios
    a = atd_masks(rng, 200, GRID, MaskConfig(clean_share=0.25))
    clean = (a.sum(1) == 0).float().mean().item()
    assert 0.1 < clean < 0.4


def test_corruption_target_is_changed_codes_only():
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 4, (8, NUM_TOKENS), generator=g)     # few codes: random draws often hit the original
    mask = torch.rand(8, NUM_TOKENS, generator=g) < 0.5
    corrupted, target = corrupt(tok, mask, 4, g)
    assert torch.equal(corrupted[~mask], tok[~mask])
    assert torch.equal(target, corrupted != tok)
    assert not target[~mask].any()
    unchanged_in_mask = (mask & ~target).float().sum() / mask.sum()
    assert 0.15 < unchanged_in_mask < 0.35                       # about 1/4 of draws hit the original code


def test_prior_corruption_draws_codes_by_their_healthy_frequency():
    from mimood.train.objectives import code_prior
    tokens = np.array([[3, 3, 3, 1, 0, 0]])
    fg = np.array([[1.0, 1.0, 0.6, 0.9, 0.0, 0.4]])                          # the 0 codes lie outside the brain
    prior = code_prior(tokens, fg, 5)
    assert prior.tolist() == [0.0, 0.25, 0.0, 0.75, 0.0]
    tok = torch.full((64, 50), 3)
    mask = torch.rand(64, 50, generator=torch.Generator().manual_seed(0)) < 0.5
    corrupted, target = corrupt(tok, mask, 5, torch.Generator().manual_seed(1), prior)
    assert set(corrupted[mask].unique().tolist()) == {1, 3} and not target[~mask].any()
    assert torch.equal(target, corrupted == 1)                               # drawing 3 again is no corruption
    assert abs(target[mask].float().mean().item() - 0.25) < 0.05


def test_vqvae_tokens_and_codebook_stats():
    torch.manual_seed(0)
    vq = VQVAE(CFG.vqvae).eval()
    x = torch.rand(2, 1, 160, 160)
    tok = vq.encode(x)
    assert tok.shape == (2, GRID, GRID)
    rec, loss, tok2 = vq(x)
    assert rec.shape == x.shape and torch.equal(tok, tok2)
    assert vq.decode(tok).shape == x.shape
    s = codebook_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert s["usage"] == 0.5 and abs(s["perplexity"] - 2.0) < 1e-9


def test_dead_codes_are_restarted():
    torch.manual_seed(0)
    vq = VQVAE(CFG.vqvae).train()
    x = torch.rand(2, 1, 160, 160)
    for _ in range(5):
        vq(x)
    q = vq.quantizer
    threshold = CFG.vqvae.dead_code_threshold / K
    dead_before = (q.ema_cluster_size / q.ema_cluster_size.sum() < threshold).sum().item()
    assert dead_before > 0
    assert vq.restart_dead_codes() == dead_before
    assert (q.ema_cluster_size / q.ema_cluster_size.sum() >= threshold).all()


def test_dead_code_restart_under_bf16_autocast():
    # mimood-train --bf16: the encoder output is bfloat16, the codebook stays float32
    torch.manual_seed(0)
    vq = VQVAE(CFG.vqvae).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vq(torch.rand(2, 1, 160, 160))
    assert vq._last_z.dtype == torch.bfloat16
    assert vq.restart_dead_codes() > 0
    assert vq.quantizer.embedding.weight.dtype == torch.float32


def test_mvtm_step_samples_by_inverse_cdf_and_keeps_unmasked(models):
    step = MVTMStep(models["mvtm"]).eval()
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, K, (2, NUM_TOKENS), generator=g).int()
    mask = torch.rand(2, NUM_TOKENS, generator=g) < 0.3
    u = torch.rand(2, NUM_TOKENS, generator=g)
    with torch.no_grad():
        out = step(tok, mask, u)
        logits = models["mvtm"](torch.where(mask, torch.full_like(tok, K), tok)).double()
    assert out.dtype == torch.int32
    assert torch.equal(out[~mask], tok[~mask])
    cdf = torch.cumsum(torch.softmax(logits, -1), -1).numpy()
    want = np.array([[np.searchsorted(cdf[b, i], u[b, i].item()) for i in range(NUM_TOKENS)] for b in range(2)])
    got = out.numpy()
    assert (got[mask.numpy()] == np.minimum(want, K - 1)[mask.numpy()]).mean() > 0.999


def test_decode_score_is_zero_on_a_perfect_restoration_and_outside_the_brain():
    torch.manual_seed(0)
    vq = VQVAE(CFG.vqvae).eval()
    enc, score = EncodeGraph(vq), DecodeScore(vq, R=2)
    with torch.no_grad():
        tok = enc(torch.rand(2, 1, 160, 160)).repeat_interleave(2, 0)
        rec = score.restoration(tok)[::2]                   # the input is its own reconstruction
        assert score(tok, rec).abs().max().item() < 1e-6
        x = rec.clone()
        x[:, :, 60:100, 60:100] += 0.3                      # an "anomaly" the restoration does not have
        x[:, :, :, :20] = 0                                 # and a background strip
        maps = score(tok, x)
    assert maps.shape == (2, 160, 160)
    assert (maps[:, 70:90, 70:90] > 0.2).all()
    assert (maps[:, :, :20] == 0).all()
