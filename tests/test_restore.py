"""The MIM-OOD restoration loop (`mimood.restore`) with tiny untrained models: what it may change, what it may not,
and its seeding."""
import numpy as np
import pytest
import torch

from mimood.config import NUM_TOKENS, preset
from mimood.models.graphs import DecodeScore, EncodeGraph
from mimood.models.transformer import TokenTransformer
from mimood.models.vqvae import VQVAE
from mimood.restore import contralateral, restore
from mimood.runtime.torch_backend import TorchEngine

CFG = preset("tiny")


@pytest.fixture(scope="module")
def engine_parts():
    torch.manual_seed(0)
    vq = VQVAE(CFG.vqvae).eval()
    atd, mvtm = TokenTransformer(CFG.transformer, "atd").eval(), TokenTransformer(CFG.transformer, "mvtm").eval()
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 160, 160), dtype=np.float32)
    x[:, :, :, :30] = 0                                        # background strip
    return vq, atd, mvtm, x


def _engine(parts, **cfg):
    vq, atd, mvtm, _ = parts
    c = CFG.restore.__class__(**{**CFG.restore.__dict__, **cfg})
    return TorchEngine(vq, atd, mvtm, c), c


def test_tokens_outside_the_mask_never_change(engine_parts):
    x = engine_parts[3]
    eng, cfg = _engine(engine_parts, T=1, R=2)
    with torch.no_grad():
        tokens = eng.encode(torch.from_numpy(x))                                # [B, N]
        scores = eng.detect(eng.repeat(tokens)).numpy()                         # [B*R, N]
    lam = float(np.median(scores))                                              # about half the tokens masked
    r = restore(eng, x, cfg, np.random.default_rng(0), lam=lam, keep_tokens=True)
    mask = scores > lam
    start = eng.repeat(tokens).numpy()
    assert 0.3 < mask.mean() < 0.7 and r.masked == [int(mask.sum())]
    assert np.array_equal(r.tokens[~mask], start[~mask])
    assert (r.tokens[mask] != start[mask]).mean() > 0.5                        # masked tokens were redrawn
    np.testing.assert_array_equal(r.token_scores, scores[::2])                  # first replica of each slice


def test_masked_tokens_are_recomputed_each_iteration_and_only_they_change(engine_parts):
    x = engine_parts[3]
    eng, cfg = _engine(engine_parts, T=3, R=2)
    with torch.no_grad():
        scores = eng.detect(eng.repeat(eng.encode(torch.from_numpy(x)))).numpy()
    lam = float(np.quantile(scores, 0.9))
    r = restore(eng, x, cfg, np.random.default_rng(0), lam=lam, keep_tokens=True)
    assert len(r.masked) == 3 and r.masked[0] == int((scores > lam).sum())
    # replay the loop step by step with the same noise: every iteration masks the current tokens' detections
    rng = np.random.default_rng(0)
    with torch.no_grad():
        tok = eng.repeat(eng.encode(torch.from_numpy(x)))
        for n in r.masked:
            mask = eng.detect(tok) > lam
            assert int(mask.sum()) == n
            new = eng.mvtm_step(tok, mask, torch.from_numpy(rng.random(tuple(mask.shape), dtype=np.float32)))
            assert torch.equal(new[~mask], tok[~mask])
            tok = new
    np.testing.assert_array_equal(r.tokens, tok.numpy())


def test_lambda_one_leaves_the_reconstruction_untouched(engine_parts):
    vq, _, _, x = engine_parts
    eng, cfg = _engine(engine_parts, T=4, R=2)
    r = restore(eng, x, cfg, np.random.default_rng(0), lam=1.0, keep_tokens=True)   # sigmoid <= 1: none above
    assert r.masked == [0]
    with torch.no_grad():
        tokens = EncodeGraph(vq)(torch.from_numpy(x))
        want = DecodeScore(vq, 2, cfg.min_pool, cfg.avg_pool)(tokens.repeat_interleave(2, 0), torch.from_numpy(x))
    np.testing.assert_array_equal(r.tokens, tokens.repeat_interleave(2, 0).numpy())
    np.testing.assert_allclose(r.maps, want.numpy(), atol=1e-6)
    # the smoothed |reconstruction - input|: zero outside the brain, positive inside (an untrained VQ-VAE)
    assert (r.maps[:, :, :30] == 0).all()
    assert r.maps.shape == (3, 160, 160) and r.maps[:, :, 40:].min() > 0


def test_restorations_differ_across_seeds_and_repeat_within_a_seed(engine_parts):
    x = engine_parts[3]
    eng, cfg = _engine(engine_parts, T=2, R=3)
    a = restore(eng, x, cfg, np.random.default_rng(5), keep_tokens=True)
    b = restore(eng, x, cfg, np.random.default_rng(5), keep_tokens=True)
    c = restore(eng, x, cfg, np.random.default_rng(6), keep_tokens=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.maps, b.maps)
    assert (a.tokens != c.tokens).mean() > 0.1
    assert not np.allclose(a.maps, c.maps)
    rows = a.tokens.reshape(3, 3, NUM_TOKENS)                                    # [B, R, N]
    assert (rows[:, 0] != rows[:, 1]).any(axis=1).all()                         # the R restorations differ
    # the default generator is seeded by cfg.seed
    d = restore(eng, x, cfg, keep_tokens=True)
    e = restore(eng, x, cfg, np.random.default_rng(cfg.seed), keep_tokens=True)
    np.testing.assert_array_equal(d.tokens, e.tokens)


def test_intensity_detector_redraws_the_bright_blocks_every_iteration_and_nothing_else(engine_parts):
    from mimood.restore import intensity_token_scores
    x = engine_parts[3].copy()
    x[0, 0, 40:80, 40:80] = 1.0                                                 # a bright square: 5 x 5 tokens
    eng, cfg = _engine(engine_parts, T=3, R=2, detector="intensity")
    scores = intensity_token_scores(x)                                          # [B, N] block means
    assert scores.shape == (3, NUM_TOKENS)
    assert scores[0].reshape(20, 20)[5:10, 5:10].min() == pytest.approx(1.0)
    lam = 0.9                                                                   # the square, nothing else
    r = restore(eng, x, cfg, np.random.default_rng(0), lam=lam, keep_tokens=True, early_stop=False)
    mask = np.repeat(scores > lam, 2, axis=0)                                   # [B*R, N], fixed
    assert mask.sum() == 2 * 25 and r.masked == [50, 50, 50]                    # the same tokens each time
    with torch.no_grad():
        start = eng.repeat(eng.encode(torch.from_numpy(x))).numpy()
    assert np.array_equal(r.tokens[~mask], start[~mask])
    np.testing.assert_array_equal(r.token_scores, scores)
    # the ATD is never asked: a detector that would mask everything changes nothing
    eng.detector = lambda tokens: torch.ones(tokens.shape)
    again = restore(eng, x, cfg, np.random.default_rng(0), lam=lam, keep_tokens=True, early_stop=False)
    np.testing.assert_array_equal(again.tokens, r.tokens)
    with pytest.raises(ValueError, match="unknown detector"):
        restore(eng, x, CFG.restore.__class__(detector="nope"))


def test_per_slice_lambdas_and_the_per_scan_rule(engine_parts):
    from dataclasses import replace

    from mimood.restore import intensity_token_scores, scan_lambda
    x = engine_parts[3].copy()
    eng, cfg = _engine(engine_parts, T=1, R=2, detector="intensity")
    scores = intensity_token_scores(x)                                          # [3, N]
    lams = np.array([np.quantile(scores[b], q) for b, q in enumerate((0.5, 0.9, 1.0))], dtype=np.float32)
    r = restore(eng, x, cfg, np.random.default_rng(0), lam=lams)
    assert r.masked == [2 * int(sum((scores[b] > lams[b]).sum() for b in range(3)))]
    # the rule: min(lam, P_q of the scan's brain tokens); brain tokens are those with a brain pixel
    images = x[:, 0]
    brain = intensity_token_scores((x > 0).astype(np.float32)) > 0
    q90 = float(np.percentile(scores[brain], 90))
    rule = replace(cfg, lam_scan_percentile=90.0)
    assert scan_lambda(images, rule, lam=1.0) == pytest.approx(q90)             # the scan's own P90 is lower
    assert scan_lambda(images, rule, lam=0.1) == 0.1                            # never above the calibrated lam
    assert scan_lambda(images, cfg, lam=1.0) == 1.0                             # no percentile: lam
    assert scan_lambda(images, replace(rule, detector="atd"), lam=1.0) == 1.0   # the ATD: lam
    assert scan_lambda(np.zeros_like(images), rule, lam=0.7) == 0.7             # no brain: lam


def test_the_positive_residual_counts_only_what_is_brighter_than_its_restoration(engine_parts):
    vq, _, _, x = engine_parts
    xt = torch.from_numpy(x)                                                    # [3, 1, H, W]
    tokens = EncodeGraph(vq).eval()(xt).repeat_interleave(2, 0)                 # [6, N]
    with torch.no_grad():
        both = {r: DecodeScore(vq, 2, 1, 1, residual=r).eval()(tokens, xt).numpy() for r in ("abs", "positive")}
        rest = DecodeScore(vq, 2).restoration(tokens).view(3, 2, 160, 160).numpy()      # [B, R, H, W]
    brighter = np.maximum(x - rest, 0).mean(1) * (x[:, 0] > 0)                 # no pooling: the R mean of it
    np.testing.assert_allclose(both["positive"], brighter, atol=1e-6)
    assert (both["positive"] <= both["abs"] + 1e-6).all() and not np.allclose(both["positive"], both["abs"])
    with pytest.raises(ValueError, match="unknown residual"):
        DecodeScore(vq, 2, residual="square")


def test_contralateral_damping_keeps_a_one_sided_spot_and_damps_what_both_sides_share(engine_parts):
    maps = np.zeros((1, 160, 160), np.float32)
    maps[0, 40:50, 20:30] = maps[0, 40:50, 130:140] = 0.6        # the same place in both hemispheres
    maps[0, 100:110, 30:40] = 0.8                                 # one side only: healthy (0) opposite
    maps[0, 120:125, 60:65], maps[0, 120:125, 95:100] = 0.8, 0.2  # a strong spot facing a weak one
    out = contralateral(maps, 0.75)
    np.testing.assert_allclose(out[0, 40:50, 20:30], 0.6 * 0.25, rtol=1e-6)
    np.testing.assert_allclose(out[0, 100:110, 30:40], 0.8)
    np.testing.assert_allclose(out[0, 120:125, 60:65], 0.8 - 0.75 * 0.2, rtol=1e-6)
    np.testing.assert_allclose(out[0, 120:125, 95:100], 0.2 * 0.25, rtol=1e-6)
    assert (out >= 0).all() and (out <= maps).all() and out.dtype == np.float32

    x = engine_parts[3]
    eng, cfg = _engine(engine_parts, T=1, R=2, detector="intensity", lam=0.5)
    _, damped = _engine(engine_parts, T=1, R=2, detector="intensity", lam=0.5, contralateral=0.75)
    with torch.no_grad():
        plain = restore(eng, x, cfg).maps
        both = restore(eng, x, damped).maps                                     # the same draws (seed)
    np.testing.assert_allclose(both, contralateral(plain, 0.75), atol=1e-6)
    assert not np.allclose(both, plain)
