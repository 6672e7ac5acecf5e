"""The MVTM + Token Critic baseline (Lezama et al. 2022; the paper's Tables 1 and 2).

The critic is a bidirectional transformer with one logit per token, like the ATD, but trained on the MVTM's own
samples instead of uniformly random codes: healthy tokens are masked with the MVTM's training masks (cosine-schedule
ratio, brush strokes or random positions), the MVTM fills the masked positions by sampling (temperature 1), and the
critic learns which positions were sampled (target = the mask, as in Lezama et al.). At inference it replaces the
ATD in the restoration loop, with a threshold chosen on healthy data (no published value).

Cost: one MVTM forward pass (no gradient) per training batch on top of an ATD-sized training; the checkpoint goes to
`<run>/critic/` (kind "atd": the same module).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score

from mimood.config import GRID, MaskConfig, RunConfig
from mimood.models.checkpoint import build_model, load_model
from mimood.models.graphs import MVTMStep
from mimood.models.masks import mvtm_masks
from mimood.train.trainer import Trainer, TrainResult

CRITIC = "critic"


def critic_objective(tokens: np.ndarray, val_tokens: np.ndarray, mvtm, batch: int, val_batches: int,
                     masks: MaskConfig, val_seed: int = 1234):
    """(loss_fn, val_fn) for the Trainer. tokens [M, 400] healthy training token maps, val_tokens [V, 400]."""
    sampler = MVTMStep(mvtm.eval())

    def step(model, tok: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
        with torch.no_grad():
            sampled = sampler(tok.int(), mask, torch.rand(tok.shape, generator=gen))    # [B, N] MVTM fills
        logits = model(sampled)                                                         # [B, N]
        return F.binary_cross_entropy_with_logits(logits.float(), mask.float()), logits

    def loss_fn(model, step_i, rng):
        tok = torch.from_numpy(tokens[rng.integers(0, len(tokens), batch)].astype(np.int64))
        mask = mvtm_masks(rng, batch, GRID, masks)
        loss, _ = step(model, tok, mask, torch.Generator().manual_seed(int(rng.integers(2**62))))
        return loss, {"mask_share": mask.float().mean().item()}

    def val_fn(model):
        rng, gen = np.random.default_rng(val_seed), torch.Generator().manual_seed(val_seed)
        losses, scores, targets = [], [], []
        for i in range(0, min(len(val_tokens), val_batches * batch), batch):
            tok = torch.from_numpy(val_tokens[i:i + batch].astype(np.int64))
            mask = mvtm_masks(rng, len(tok), GRID, masks)
            loss, logits = step(model, tok, mask, gen)
            losses.append(loss.item())
            scores.append(logits.detach().float().flatten().numpy())
            targets.append(mask.flatten().numpy())
        y, p = np.concatenate(targets), np.concatenate(scores)
        return {"loss": float(np.mean(losses)), "ap": float(average_precision_score(y, p)),
                "auroc": float(roc_auc_score(y, p))}

    return loss_fn, val_fn


def train_token_critic(run: str | Path, steps: int | None = None, progress: bool = True) -> TrainResult:
    """Train `<run>/critic/` on the run's cached healthy tokens with its MVTM and transformer settings."""
    run = Path(run)
    cfg = RunConfig.load(run / "config.json")
    o = cfg.optim_transformer
    if steps is not None:
        o.steps, o.val_every = steps, min(o.val_every, steps)
    with np.load(run / "data" / "tokens.npz") as z:
        train_tok, val_tok = z["train"].reshape(-1, z["train"].shape[-1]), z["val"]
    mvtm, _ = load_model(run / "mvtm" / "best.safetensors")
    trainer = Trainer(build_model("atd", cfg.transformer), "atd", o, run / CRITIC, cfg.seed)
    return trainer.fit(*critic_objective(train_tok, val_tok, mvtm, o.batch_size, o.val_batches, cfg.masks),
                       progress=progress)
