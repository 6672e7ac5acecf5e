"""Image-space synthetic lesions for the ATD (mimood.models.lesions): painted inside the brain only, visible,
seeded, and the ATD target is exactly "code changed and touched by the lesion"."""
import numpy as np
import torch

from mimood.config import preset
from mimood.models.checkpoint import build_model
from mimood.train import objectives
from mimood.models.lesions import lesion_tokens, paint_lesions, touched_tokens

CFG = preset("tiny")


def _slice(seed=0):
    """A brain-like slice: a textured disc in [0.2, 0.9] on a zero background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:160, 0:160]
    brain = (yy - 80) ** 2 + (xx - 80) ** 2 < 60 ** 2
    img = 0.5 + 0.2 * np.sin(xx / 7.0) * np.cos(yy / 5.0) + 0.02 * rng.normal(size=(160, 160))
    return np.where(brain, np.clip(img, 0.2, 0.9), 0.0).astype(np.float32), brain


def test_lesions_stay_inside_the_brain_and_change_it():
    img, brain = _slice()
    for seed in range(20):
        out, w = paint_lesions(img, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.float32
        assert np.all(out[~brain] == 0) and np.all(w[~brain] == 0)      # background untouched
        assert out[brain].min() > 0 and out.max() <= 1.0                 # brain stays brain, in range
        assert (w >= 0.5).any()                                          # at least one lesion was painted
        assert np.all(out[w == 0] == img[w == 0])                        # nothing changes outside the lesion
    a = paint_lesions(img, np.random.default_rng(5))
    b = paint_lesions(img, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])    # seeded


def test_a_slice_without_brain_is_left_alone():
    out, w = paint_lesions(np.zeros((160, 160), np.float32), np.random.default_rng(0))
    assert not out.any() and not w.any()


def test_touched_tokens_marks_any_pixel_at_half_weight():
    w = np.zeros((1, 160, 160), np.float32)
    w[0, 9, 17] = 0.5                    # token (1, 2)
    w[0, 100, 100] = 0.49                # below half: not a lesion pixel
    t = touched_tokens(w).reshape(20, 20)
    assert t.sum() == 1 and t[1, 2]


def test_lesion_tokens_target_is_changed_and_touched():
    torch.manual_seed(0)
    vq = build_model("vqvae", CFG.vqvae)
    images = np.stack([_slice(s)[0] for s in range(3)])
    vq.train()(torch.from_numpy(images)[:, None])
    vq.after_step(1)                                  # data-driven codebook init, as at training's first step
    vq.eval()
    with torch.no_grad():
        clean = vq.encode(torch.from_numpy(images)[:, None]).flatten(1).numpy().astype(np.int16)
    tok, target = lesion_tokens(vq, images, clean, np.random.default_rng(1), batch=2)
    assert tok.shape == target.shape == (3, 400) and target.dtype == bool
    # the same draws again give the painted weights, hence the touched tokens
    rng = np.random.default_rng(1)
    touched = touched_tokens(np.stack([paint_lesions(im, rng)[1] for im in images]))
    assert np.array_equal(target, touched & (tok != clean))
    assert target.any()


def test_atd_objective_mixes_synthetic_lesions_in_and_reports_both():
    rng = np.random.default_rng(0)
    K = CFG.vqvae.num_embeddings
    tokens = rng.integers(0, K, (16, 400)).astype(np.int16)
    lesions = {"train": tokens.copy(), "train_target": rng.uniform(size=(16, 400)) < 0.1,
               "val": tokens[:8].copy(), "val_target": rng.uniform(size=(8, 400)) < 0.1}
    masks = type(CFG.masks)(**{**CFG.masks.__dict__, "lesion_share": 1.0})
    loss_fn, val_fn = objectives.atd_objective(tokens, tokens[:8], 8, 1, masks, K, lesions=lesions)
    model = build_model("atd", CFG.transformer)
    loss, metrics = loss_fn(model, 0, np.random.default_rng(3))
    # share 1.0: the batch is all synthetic lesions, so its corrupt share is that of the lesion targets
    assert 0.05 < metrics["corrupt_share"] < 0.15 and torch.isfinite(loss)
    with torch.no_grad():
        val = val_fn(model.eval())
    assert {"ap", "auroc", "lesion_ap", "lesion_auroc", "code_loss", "lesion_loss"} <= set(val)
    assert val["loss"] == val["lesion_loss"]                             # mixed in the training proportion
