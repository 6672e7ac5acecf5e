"""Training objectives and validation metrics of the four models, as (loss_fn, val_fn) pairs for the Trainer.

- VQ-VAE: MAE reconstruction + commitment (MONAI EMA quantizer), broad intensity augmentation.
- MVTM:   cross-entropy on masked positions only; masks = cosine-schedule ratio, painted as brush strokes or
          uniformly random (MaskGIT + the paper's brush masks).
- ATD:    BCE per token; input = tokens with brush-stroke regions replaced by random codes, target = changed;
          optionally mixed with image-space synthetic lesions re-encoded by the VQ-VAE (mimood.train.lesions).
- AR:     next-token cross-entropy in raster order.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from mimood.config import GRID, MaskConfig
from mimood.data.augment import intensity_augment, spatial_augment
from mimood.models.masks import atd_masks, corrupt, mvtm_masks
from mimood.models.vqvae import codebook_stats


def _torch_gen(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


class Draw:
    """Training-batch indices into n items: uniform (`rng.integers`, as before weights existed) or with sampling
    probabilities p [n] (mimood.data.slices: each data source its share), by inverse CDF."""

    def __init__(self, n: int, p: np.ndarray | None = None):
        if p is not None and len(p) != n:
            raise ValueError(f"sampling probabilities for {len(p)} items, but there are {n}")
        self.n = n
        self.cdf = None if p is None else np.cumsum(np.asarray(p, np.float64) / np.sum(p))

    def __call__(self, rng: np.random.Generator, size: int) -> np.ndarray:
        if self.cdf is None:
            return rng.integers(0, self.n, size)
        return np.minimum(np.searchsorted(self.cdf, rng.random(size), side="right"), self.n - 1)


def _batches(n: int, batch: int, limit: int):
    """Deterministic validation batches: index ranges over the first limit*batch items."""
    stop = min(n, limit * batch)
    for i in range(0, stop, batch):
        yield slice(i, min(i + batch, stop))


# -- VQ-VAE ---------------------------------------------------------------------------------------------------
def vqvae_objective(images: np.ndarray, val_images: np.ndarray, batch: int, val_batches: int,
                    p: np.ndarray | None = None):
    """images: [N, 160, 160] float16 in [0, 1] (train), val_images likewise (held-out volumes); p: sampling
    probabilities of the training images (None: uniform)."""
    draw = Draw(len(images), p)

    def loss_fn(model: nn.Module, step: int, rng: np.random.Generator):
        idx = draw(rng, batch)
        x = torch.from_numpy(images[idx].astype(np.float32))[:, None]      # [B, 1, H, W]
        g = _torch_gen(rng)
        x = intensity_augment(spatial_augment(x, g), g)
        rec, q_loss, tokens = model(x)
        l1 = (rec - x).abs().mean()
        core = getattr(model, "module", model)
        return l1 + q_loss, {"l1": l1.item(), "commit": q_loss.item(),
                             **codebook_stats(tokens, core.cfg.num_embeddings)}

    def val_fn(model: nn.Module) -> dict[str, float]:
        err_sum = brain_err = brain_n = n = 0.0
        all_tokens = []
        for s in _batches(len(val_images), batch, val_batches):
            x = torch.from_numpy(val_images[s].astype(np.float32))[:, None]
            tokens = model.encode(x)
            rec = model.decode(tokens).clamp(0, 1)
            err = (rec - x).abs()
            brain = x > 0
            err_sum += err.sum().item()
            n += err.numel()
            brain_err += err[brain].sum().item()
            brain_n += brain.sum().item()
            all_tokens.append(tokens)
        stats = codebook_stats(torch.cat(all_tokens), model.cfg.num_embeddings)
        return {"loss": err_sum / n, "mae": err_sum / n, "mae_brain": brain_err / max(brain_n, 1), **stats}

    return loss_fn, val_fn


# -- transformers ---------------------------------------------------------------------------------------------
def mvtm_objective(tokens: np.ndarray, val_tokens: np.ndarray, batch: int, val_batches: int,
                   masks: MaskConfig, val_seed: int = 1234, p: np.ndarray | None = None):
    """tokens: [M, 400] int (train, augmented variants stacked), val_tokens [V, 400]; p [M]: sampling
    probabilities (None: uniform)."""
    draw = Draw(len(tokens), p)

    def step(model: nn.Module, tok: torch.Tensor, mask: torch.Tensor):
        core = getattr(model, "module", model)
        inp = torch.where(mask, torch.full_like(tok, core.mask_id), tok)
        logits = model(inp)                                                # [B, N, K]
        loss = F.cross_entropy(logits[mask].float(), tok[mask])
        acc = (logits[mask].argmax(-1) == tok[mask]).float().mean()
        return loss, acc

    def loss_fn(model, step_i, rng):
        tok = torch.from_numpy(tokens[draw(rng, batch)].astype(np.int64))
        loss, acc = step(model, tok, mvtm_masks(rng, batch, GRID, masks))
        return loss, {"acc": acc.item()}

    def val_fn(model):
        rng = np.random.default_rng(val_seed)
        losses, accs = [], []
        for s in _batches(len(val_tokens), batch, val_batches):
            tok = torch.from_numpy(val_tokens[s].astype(np.int64))
            loss, acc = step(model, tok, mvtm_masks(rng, len(tok), GRID, masks))
            losses.append(loss.item())
            accs.append(acc.item())
        return {"loss": float(np.mean(losses)), "masked_acc": float(np.mean(accs))}

    return loss_fn, val_fn


def code_prior(tokens: np.ndarray, fg: np.ndarray, num_codes: int) -> torch.Tensor:
    """[K] float64 frequencies of the codes of brain tokens (fg >= 0.5): the "prior" ATD corruption draws from it."""
    counts = np.bincount(tokens[np.asarray(fg, np.float32) >= 0.5].astype(np.int64), minlength=num_codes)
    return torch.from_numpy(counts / max(counts.sum(), 1))


def atd_objective(tokens: np.ndarray, val_tokens: np.ndarray, batch: int, val_batches: int,
                  masks: MaskConfig, num_codes: int, val_seed: int = 1234, code_probs: torch.Tensor | None = None,
                  lesions: dict[str, np.ndarray] | None = None, p: np.ndarray | None = None,
                  lesion_p: np.ndarray | None = None):
    """BCE of the per-token detector on brush-stroke corruptions; code_probs: see `mimood.models.masks.corrupt`.

    With `lesions` (mimood.train.lesions: "train"/"val" corrupted tokens [M, N] and "train_target"/"val_target"
    [M, N] bool) a share `masks.lesion_share` of every batch is drawn from the image-space synthetic lesions
    instead. Validation then reports both kinds (ap/auroc: code corruptions, lesion_ap/lesion_auroc: synthetic
    lesions) and its loss is the two losses mixed in the training proportion. p / lesion_p: sampling probabilities
    of the clean and the lesion training rows (None: uniform)."""
    share = masks.lesion_share if lesions is not None else 0.0
    draw = Draw(len(tokens), p)
    draw_lesion = Draw(len(lesions["train"]), lesion_p) if lesions is not None else None

    def step(model, tok, mask, gen):
        corrupted, target = corrupt(tok, mask, num_codes, gen, code_probs)
        logits = model(corrupted)                                          # [B, N]
        return F.binary_cross_entropy_with_logits(logits.float(), target.float()), logits, target

    def loss_fn(model, step_i, rng):
        n_les = int(rng.binomial(batch, share)) if share > 0 else 0
        tok = torch.from_numpy(tokens[draw(rng, batch - n_les)].astype(np.int64))
        corrupted, target = corrupt(tok, atd_masks(rng, len(tok), GRID, masks), num_codes, _torch_gen(rng),
                                    code_probs)
        if n_les:
            pick = draw_lesion(rng, n_les)
            corrupted = torch.cat([corrupted, torch.from_numpy(lesions["train"][pick].astype(np.int64))])
            target = torch.cat([target, torch.from_numpy(lesions["train_target"][pick])])
        logits = model(corrupted)                                          # [B, N]
        loss = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return loss, {"corrupt_share": target.float().mean().item()}

    def val_fn(model):
        rng = np.random.default_rng(val_seed)
        gen = torch.Generator().manual_seed(val_seed)
        losses, scores, targets = [], [], []
        for s in _batches(len(val_tokens), batch, val_batches):
            tok = torch.from_numpy(val_tokens[s].astype(np.int64))
            loss, logits, target = step(model, tok, atd_masks(rng, len(tok), GRID, masks), gen)
            losses.append(loss.item())
            scores.append(logits.float().flatten().numpy())
            targets.append(target.flatten().numpy())
        y, p = np.concatenate(targets), np.concatenate(scores)
        out = {"loss": float(np.mean(losses)), "ap": float(average_precision_score(y, p)),
               "auroc": float(roc_auc_score(y, p))}
        if share > 0:
            les_losses, scores, targets = [], [], []
            for s in _batches(len(lesions["val"]), batch, val_batches):
                logits = model(torch.from_numpy(lesions["val"][s].astype(np.int64)))
                target = torch.from_numpy(lesions["val_target"][s])
                les_losses.append(F.binary_cross_entropy_with_logits(logits.float(), target.float()).item())
                scores.append(logits.float().flatten().numpy())
                targets.append(target.flatten().numpy())
            y, p = np.concatenate(targets), np.concatenate(scores)
            both = 0 < y.sum() < y.size          # a tokenizer still collapsed (first steps) changes no code: NaN
            out.update(code_loss=out["loss"], lesion_loss=float(np.mean(les_losses)),
                       lesion_ap=float(average_precision_score(y, p)) if both else float("nan"),
                       lesion_auroc=float(roc_auc_score(y, p)) if both else float("nan"))
            out["loss"] = (1 - share) * out["code_loss"] + share * out["lesion_loss"]
        return out

    return loss_fn, val_fn


# -- denoising autoencoder (baseline) ----------------------------------------------------------------------
def dae_objective(images: np.ndarray, val_images: np.ndarray, batch: int, val_batches: int, cfg,
                  p: np.ndarray | None = None, val_seed: int = 1234):
    """Coarse-noise denoising (mimood.models.dae): MSE between DAE(x + coarse noise) and x, on the same flips and
    rotations as the token models; validation: MSE on the held-out slices with seeded noise, and the residual
    |x - DAE(x)| of the clean slices inside the brain (what the baseline's anomaly map is made of)."""
    from mimood.models.dae import coarse_noise
    draw = Draw(len(images), p)

    def loss_fn(model, step_i, rng):
        x = torch.from_numpy(images[draw(rng, batch)].astype(np.float32))[:, None]
        g = _torch_gen(rng)
        x = spatial_augment(x, g)
        loss = F.mse_loss(model(coarse_noise(x, cfg, g)).float(), x)
        return loss, {}

    def val_fn(model):
        g = torch.Generator().manual_seed(val_seed)
        losses, res, n = [], 0.0, 0
        for s in _batches(len(val_images), batch, val_batches):
            x = torch.from_numpy(val_images[s].astype(np.float32))[:, None]
            losses.append(F.mse_loss(model(coarse_noise(x, cfg, g)).float(), x).item())
            brain = x > 0
            res += (model(x).float() - x).abs()[brain].sum().item()
            n += int(brain.sum())
        return {"loss": float(np.mean(losses)), "clean_residual_brain": res / max(n, 1)}

    return loss_fn, val_fn


def ar_objective(tokens: np.ndarray, val_tokens: np.ndarray, batch: int, val_batches: int,
                 p: np.ndarray | None = None):
    draw = Draw(len(tokens), p)

    def nll(model, tok):
        logits = model(tok)                                                # [B, N, K]
        return F.cross_entropy(logits.float().flatten(0, 1), tok.flatten())

    def loss_fn(model, step_i, rng):
        tok = torch.from_numpy(tokens[draw(rng, batch)].astype(np.int64))
        return nll(model, tok), {}

    def val_fn(model):
        losses = [nll(model, torch.from_numpy(val_tokens[s].astype(np.int64))).item()
                  for s in _batches(len(val_tokens), batch, val_batches)]
        return {"loss": float(np.mean(losses))}

    return loss_fn, val_fn
