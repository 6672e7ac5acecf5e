"""OOD features, fitting, scan scoring and the evaluation table on a tiny run built in the test.

The run is real files (config.json, seeded MVTM and VQ-VAE checkpoints, tokens.npz, val_slices.npz), so fit_ood and
OODScorer.load read exactly what a trained run holds. Healthy tokens use codes 0-7 only; anomalies use
codes the fit never saw.
"""
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from mimood.config import preset
from mimood.data.slices import SliceSet, load_slice_set, save_slice_set
from mimood.errors import InputError
from mimood.eval.metrics import detection_metrics
from mimood.eval.ood import EvalCase, evaluate_ood, format_table
from mimood.models.checkpoint import build_model, load_model, save_model
from mimood.models.graphs import encode_slices
from mimood.ood.atlas import AtlasFit, slice_bins
from mimood.ood.features import FeatureGraph, mask_groups, mvtm_features
from mimood.ood.mirror import mirror_slices
from mimood.ood.scan import SLICE_SCORES, Aggregation, OODScorer, brain_share, brain_tokens, scan_aggregate, slice_aggregate
from mimood.train.ood_fit import OODFitConfig, fit_ood

GRID = 20


def _disc_fg() -> np.ndarray:
    """Brain share per token [400]: 1 inside a disc of radius 7, a partial rim, 0 outside."""
    r, c = np.divmod(np.arange(GRID * GRID), GRID)
    dist = np.hypot(r - 9.5, c - 9.5)
    return np.clip(7.5 - dist, 0, 1).astype(np.float16)


def _healthy_tokens(rng, n: int) -> np.ndarray:
    """[n, 400] codes 0-7: a smooth pattern with 10% random codes from the same set; background code 0."""
    r, c = np.divmod(np.arange(GRID * GRID), GRID)
    base = np.broadcast_to((r // 3 + c // 4) % 8, (n, GRID * GRID)).copy()
    noise = rng.random(base.shape) < 0.1
    base[noise] = rng.integers(0, 8, size=int(noise.sum()))
    base[:, _disc_fg() == 0] = 0
    return base.astype(np.int16)


def make_run(root, n_train=24, n_val=12, seed=0):
    cfg = preset("tiny")
    root.mkdir(parents=True, exist_ok=True)
    cfg.save(root / "config.json")
    torch.manual_seed(seed)
    save_model(build_model("mvtm", cfg.transformer), root / "mvtm" / "best.safetensors", "mvtm")
    # the fit encodes the mirrored validation slices (the `mirror` score's healthy reference)
    save_model(build_model("vqvae", cfg.vqvae), root / "vqvae" / "best.safetensors", "vqvae")
    rng = np.random.default_rng(seed)
    fg = _disc_fg()
    (root / "data").mkdir()
    np.savez(root / "data" / "tokens.npz",
             train=np.stack([_healthy_tokens(rng, n_train), _healthy_tokens(rng, n_train)]),
             fg_train=np.tile(fg, (n_train, 1)), val=_healthy_tokens(rng, n_val), fg_val=np.tile(fg, (n_val, 1)))
    save_slice_set(SliceSet(np.zeros((n_train, 160, 160), np.float16), np.repeat([0, 1, 2], n_train // 3),
                            np.arange(n_train), ["t0", "t1", "t2"]), root / "data" / "train_slices.npz")
    half = n_val // 2
    save_slice_set(SliceSet(np.zeros((n_val, 160, 160), np.float16), np.repeat([0, 1], [half, n_val - half]),
                            np.arange(n_val), ["v0", "v1"]), root / "data" / "val_slices.npz")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = make_run(tmp_path_factory.mktemp("oodrun") / "run")
    fit_ood(root, OODFitConfig(), progress=False)
    return root


def _anomalous(tokens: np.ndarray) -> np.ndarray:
    """A 4 x 4 patch of unseen codes 20-31 inside the brain disc of every slice."""
    out = tokens.copy().reshape(-1, GRID, GRID)
    out[:, 8:12, 8:12] = 20 + np.arange(16).reshape(4, 4) % 12
    return out.reshape(len(tokens), -1)


# -- features -------------------------------------------------------------------------------------------------

def test_mask_groups_partition_and_neighbours():
    g = mask_groups(GRID, 2)
    assert g.shape == (4, 400) and (g.sum(axis=0) == 1).all() and (g.sum(axis=1) == 100).all()
    grid = g.reshape(4, GRID, GRID)
    # every masked cell's 8 neighbours are in other groups (unmasked in that pass)
    assert not (grid[:, 1:, :] & grid[:, :-1, :]).any() and not (grid[:, :, 1:] & grid[:, :, :-1]).any()
    assert not (grid[:, 1:, 1:] & grid[:, :-1, :-1]).any() and not (grid[:, 1:, :-1] & grid[:, :-1, 1:]).any()


def test_masked_features_are_context_only_predictions():
    cfg = preset("tiny").transformer
    torch.manual_seed(0)
    mvtm = build_model("mvtm", cfg).eval()
    tokens = _healthy_tokens(np.random.default_rng(0), 3)
    h = mvtm_features(FeatureGraph(mvtm, "masked"), tokens)                      # [3, 400, 32]
    groups = mask_groups(GRID, 2)
    with torch.no_grad():
        for g in groups:
            masked = np.where(g, cfg.vocab_size, tokens)
            ref = mvtm.features(torch.from_numpy(masked)).numpy()
            np.testing.assert_allclose(h[:, g], ref[:, g], rtol=1e-5, atol=1e-6)
        # unmasked pass = plain features, and the head of h gives the model's logits exactly
        hu = mvtm_features(FeatureGraph(mvtm, "unmasked"), tokens)
        np.testing.assert_allclose(mvtm.head(torch.from_numpy(hu)).numpy(),
                                   mvtm(torch.from_numpy(tokens.astype(np.int64))).numpy(), rtol=1e-5, atol=1e-6)
    # a token's own code never reaches its masked-pass feature
    changed = tokens.copy()
    changed[:, 210] = 31
    h2 = mvtm_features(FeatureGraph(mvtm, "masked"), changed)
    np.testing.assert_array_equal(h2[:, 210], h[:, 210])
    assert not np.allclose(h2[:, 211], h[:, 211])                                # the neighbour sees it
    with pytest.raises(ValueError, match="pass_type"):
        FeatureGraph(mvtm, "half")


def test_brain_share_is_the_token_average_pool():
    brain = np.zeros((1, 160, 160), bool)
    brain[0, :8, :4] = True                       # half of token 0
    brain[0, 8:16, 8:16] = True                   # all of token 21
    fg = brain_share(brain)
    assert fg.shape == (1, 400) and fg[0, 0] == 0.5 and fg[0, 21] == 1.0 and fg.sum() == 1.5


# -- aggregation ----------------------------------------------------------------------------------------------

def test_aggregation_hand_case():
    scores = np.array([[5.0, 1.0, 9.0, 3.0], [2.0, 4.0, 6.0, 8.0]])
    fg = np.array([[1.0, 1.0, 0.2, 0.6], [0.0, 0.3, 0.1, 0.0]])
    mask = brain_tokens(fg, 0.5)
    # slice 0: tokens 0, 1, 3 (token 2 is mostly background); slice 1 has none >= 0.5: falls back to fg > 0
    np.testing.assert_array_equal(mask, [[1, 1, 0, 1], [0, 1, 1, 0]])
    np.testing.assert_allclose(slice_aggregate(scores, mask, 2), [4.0, 5.0])     # (5+3)/2, (4+6)/2
    np.testing.assert_allclose(slice_aggregate(scores, mask, 0.5), [4.0, 6.0])   # ceil(1.5) = 2, ceil(1) = 1
    assert scan_aggregate(np.array([1.0, 7.0, 3.0, 5.0]), 3) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no brain"):
        brain_tokens(np.zeros((1, 4)), 0.5)


def test_atlas_hand_case():
    np.testing.assert_array_equal(slice_bins(5), [0, 2, 5, 7, 9])
    np.testing.assert_array_equal(slice_bins(1), [5])
    fit = AtlasFit(n_tokens=2, bins=3)
    fit.add(np.array([[1.0, 3.0], [3.0, 5.0]]), np.array([[True, True], [True, False]]), np.array([0, 0]))
    fit.add(np.array([[10.0, 0.0]]), np.array([[True, False]]), np.array([1]))
    atlas = fit.finish()
    # bin 0 pools 1, 3, 3: mean 7/3, variance 8/9. Position 0 (n = 2: mean 2, var 1) keeps weight 2/12,
    # position 1 (n = 1: mean 3, var 0) keeps 1/11.
    np.testing.assert_allclose(atlas.mean[0], [41 / 18, 79 / 33], rtol=1e-12)
    np.testing.assert_allclose(atlas.std[0] ** 2, [49 / 54, 80 / 99], rtol=1e-12)
    # bin 1: one value, no spread: the variance floor keeps z finite; bin 2 is empty: pooled over all bins
    np.testing.assert_allclose(atlas.mean[1], [10.0, 10.0])
    assert np.all(atlas.std[1] > 0) and np.all(atlas.std[1] < 1e-5)
    np.testing.assert_allclose(atlas.mean[2], 17 / 4, rtol=1e-12)
    np.testing.assert_allclose(atlas.std[2] ** 2, (1 + 9 + 9 + 100) / 4 - (17 / 4) ** 2, rtol=1e-12)
    z = atlas.normalise(np.array([[41 / 18 + 2 * math.sqrt(49 / 54), 0.0]]), np.array([0]))
    assert z[0, 0] == pytest.approx(2.0)


# -- fitting --------------------------------------------------------------------------------------------------

def test_fit_writes_loadable_statistics(run):
    scorer = OODScorer.load(run)
    meta = scorer.meta
    n_brain = int((np.load(run / "data" / "tokens.npz")["fg_train"] >= scorer.agg.fg_min).sum())
    assert meta["fit"]["tokens"] == n_brain and meta["fit"]["slices"] == 24 and meta["fit"]["knn_bank"] == 24
    assert meta["fit"]["D"] in (8, 16, 24) and set(meta["fit"]["dim_sweep_auroc"]) == {"8", "16", "24"}
    assert scorer.vim.D == meta["fit"]["D"] and scorer.vim.alpha > 0
    assert scorer.W.shape == (32, 32) and scorer.mahalanobis.means.shape == (32, 32)
    # every score has one reference value per validation volume (2 here); the default scan score is `mirror`
    assert set(meta["reference"]) == set(SLICE_SCORES) and all(len(v) == 2 for v in meta["reference"].values())
    assert meta["scan_score"] == "mirror" and set(scorer.atlas) == set(SLICE_SCORES) - {"mirror", "knn"}
    z = np.load(run / "data" / "tokens.npz")
    images = load_slice_set(run / "data" / "val_slices.npz").images[:6].astype(np.float32)   # volume v0
    vqvae = load_model(run / "vqvae" / "best.safetensors")[0].eval()
    mirrored = encode_slices(vqvae, mirror_slices(images), 8)
    rep = scorer.report(scorer.score(z["val"][:6], z["fg_val"][:6], mirrored))
    assert rep["score"] == "mirror" and rep["reference_scans"] == 2
    assert rep["value"] == pytest.approx(meta["reference"]["mirror"][0])        # volume v0 is a reference
    assert scorer.summary()["scan_score"] == "mirror" and scorer.summary()["reference"]["n"] == 2
    # without the mirrored tokens the other scores are still there
    assert "mirror" not in scorer.score(z["val"][:6], z["fg_val"][:6]).scan
    with pytest.raises(ValueError, match="mirrored slices"):
        scorer.report(scorer.score(z["val"][:6], z["fg_val"][:6]))
    assert scorer.report(scorer.score(z["val"][:6], z["fg_val"][:6]), "nll")["value"] == pytest.approx(
        meta["reference"]["nll"][0])


def test_fit_is_deterministic_and_subsamples(tmp_path, run):
    cfg = OODFitConfig(pass_type="masked", max_fit_tokens=500)
    a = fit_ood(run, cfg, out=tmp_path / "a.safetensors", progress=False)
    b = fit_ood(run, cfg, out=tmp_path / "b.safetensors", progress=False)
    assert a["fit"]["tokens"] == 500 and a["pass_type"] == "masked"
    ta, tb = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert set(ta) == set(tb) and all(np.array_equal(ta[k], tb[k]) for k in ta)
    a["fit"].pop("seconds"), b["fit"].pop("seconds")
    assert a == b


def test_unseen_codes_score_higher(run):
    scorer = OODScorer.load(run)
    tok = np.load(run / "data" / "tokens.npz")
    val, fg = tok["val"][:6], tok["fg_val"][:6]
    healthy, bad = scorer.score(val, fg), scorer.score(_anomalous(val), fg)
    for name in ("vim", "residual", "mahalanobis", "knn"):
        assert bad.scan[name] > healthy.scan[name], name
        assert (bad.slice[name] > healthy.slice[name]).all(), name
    # token level: the patch outranks the untouched brain tokens of the same slices
    patch = np.zeros((GRID, GRID), bool)
    patch[8:12, 8:12] = True
    patch = np.broadcast_to(patch.ravel(), val.shape)
    for name in ("residual", "mahalanobis"):
        s = bad.token[name]
        assert s[patch].mean() > np.percentile(s[bad.brain & ~patch], 95), name


def test_load_and_mvtm_checks(tmp_path, run):
    with pytest.raises(InputError, match="no fitted OOD"):
        OODScorer.load(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not an OOD statistics file"):
        OODScorer.load(tmp_path / "junk.safetensors")
    other = make_run(tmp_path / "other")
    fit_ood(other, OODFitConfig(dim_shares=(0.5,)), progress=False)
    torch.manual_seed(1)                                     # a retrained MVTM replaces the fitted one
    save_model(build_model("mvtm", preset("tiny").transformer), other / "mvtm" / "best.safetensors", "mvtm")
    with pytest.raises(InputError, match="not the one"):
        OODScorer.load(other).features(np.zeros((1, 400), np.int16))
    with pytest.raises(ValueError, match="pass_type"):
        fit_ood(run, OODFitConfig(pass_type="half"), progress=False)


# -- evaluation table -----------------------------------------------------------------------------------------

def test_evaluate_ood_labels_counts_and_rows(run):
    scorer = OODScorer.load(run)
    tok = np.load(run / "data" / "tokens.npz")
    val, fg = tok["val"][:3], tok["fg_val"][:3]
    brain = np.repeat(np.repeat(fg.reshape(3, GRID, GRID) > 0, 8, axis=1), 8, axis=2)   # [3, 160, 160]
    labels = np.zeros((3, 160, 160), bool)
    labels[1, 80:81, 80:82] = True                       # 2 px: ambiguous with min_lesion_px = 5, left out
    labels[2, 64:96, 64:96] = True                       # tokens 8-11 x 8-11: the anomalous patch
    lesion_tokens = np.zeros((3, GRID, GRID), bool)
    lesion_tokens[2, 8:12, 8:12] = True
    atd = np.where(lesion_tokens.reshape(3, -1), 0.9, 0.1)
    maps = labels.astype(np.float32)
    lesion_tok = val.copy()
    lesion_tok[2] = _anomalous(val[2:3])[0]
    cases = [EvalCase("healthy", val, fg, None, {"atd": np.full((3, 400), 0.1)}, {"map": np.zeros_like(maps)}, brain),
             EvalCase("lesion", lesion_tok, fg, labels, {"atd": atd}, {"map": maps}, brain)]
    t = evaluate_ood(cases, scorer, min_lesion_px=5)
    assert t["counts"] == {"scans": 2, "lesion_scans": 1, "slices": 5, "lesion_slices": 1,
                           "brain_tokens": int(2 * brain_tokens(fg, scorer.agg.fg_min).sum()),
                           "lesion_tokens": 16 + 1, "min_lesion_px": 5}
    # the 2-px slice has one lesion token (token 10, 10); its ATD score 0.1 ties with the healthy tokens
    assert t["slice"]["atd"] == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}
    assert t["slice"]["map"] == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}
    assert t["scan"]["map"]["auroc"] == 1.0 and t["scan"]["atd"]["auroc"] == 1.0
    assert "map" not in t["token"] and t["token"]["atd"]["auroc"] < 1.0
    # the table's vim row is exactly the scorer's slice scores ranked
    expected = np.concatenate([scorer.score(val, fg).slice["vim"], scorer.score(lesion_tok, fg).slice["vim"][[0, 2]]])
    assert t["slice"]["vim"] == detection_metrics(expected, np.array([0, 0, 0, 0, 1]))
    assert set(t["slice"]) == {"vim", "vim_nll", "residual", "mahalanobis", "energy", "max_logit", "nll", "knn", "atd", "map"}
    assert "vim" in format_table(t)
    # precomputed per-slice parts (repeated evaluations) give the same table
    from dataclasses import replace
    with_parts = [replace(c, parts=scorer.parts(scorer.features(c.tokens), c.tokens, c.fg)) for c in cases]
    assert evaluate_ood(with_parts, scorer, min_lesion_px=5) == t
    # one class missing: NaN, not an error
    only_lesion = evaluate_ood(cases[1:], scorer, Aggregation(token_topk=3, slice_topm=1))
    assert math.isnan(only_lesion["scan"]["vim"]["auroc"]) and only_lesion["aggregation"]["token_topk"] == 3
    with pytest.raises(ValueError, match="some cases"):
        evaluate_ood([cases[0], EvalCase("x", val, fg, None)], scorer)
    with pytest.raises(ValueError, match="must differ"):
        evaluate_ood([EvalCase("x", val, fg, None, {"vim": atd})], scorer)


def test_token_scores_match_direct_formulas(run):
    from scipy.special import log_softmax
    scorer = OODScorer.load(run)
    tok = np.load(run / "data" / "tokens.npz")["val"][:2].astype(np.int64)
    h = scorer.features(tok).astype(np.float64)                                 # [2, 400, 32]
    t = scorer.token_scores(h, tok)
    logits = h @ scorer.W.T + scorer.b                                           # [2, 400, 32]
    r = np.linalg.norm((h - scorer.vim.u) @ scorer.vim.R, axis=-1)
    z = tok[..., None]
    nll = -np.take_along_axis(log_softmax(logits, axis=-1), z, axis=-1)[..., 0]
    # ViM's virtual logit alpha * r as a 33rd class
    virtual = np.concatenate([logits, scorer.vim.alpha * r[..., None]], axis=-1)
    np.testing.assert_allclose(t["nll"], nll, rtol=1e-10)
    np.testing.assert_allclose(t["vim_nll"], -np.take_along_axis(log_softmax(virtual, -1), z, -1)[..., 0],
                               rtol=1e-10)
    np.testing.assert_allclose(t["vim"], scorer.vim.alpha * r - np.log(np.exp(logits).sum(-1)), rtol=1e-10)
    np.testing.assert_allclose(t["max_logit"], -logits.max(-1), rtol=1e-10)
    d = h - scorer.mahalanobis.means[tok]
    np.testing.assert_allclose(t["mahalanobis"], np.einsum("snd,de,sne->sn", d, scorer.mahalanobis.precision, d),
                               rtol=1e-8)


@pytest.mark.parametrize("pass_type", ["unmasked", "masked"])
def test_feature_graph_exports_to_onnx(pass_type):
    """The runtime computes h with an exported FeatureGraph: same exporter settings as the loop graphs."""
    import io

    import onnx
    import onnxruntime as ort
    torch.manual_seed(0)
    graph = FeatureGraph(build_model("mvtm", preset("tiny").transformer), pass_type).eval()
    tok = torch.randint(0, 32, (2, 400), dtype=torch.int32)
    program = torch.onnx.export(graph, (tok,), input_names=["tokens"], output_names=["h"], opset_version=18,
                                dynamo=True, external_data=False, verbose=False)
    buf = io.BytesIO()
    onnx.save(program.model_proto, buf)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"tokens": tok.numpy()})[0]
    np.testing.assert_allclose(got, mvtm_features(graph, tok.numpy()), rtol=1e-4, atol=1e-5)
