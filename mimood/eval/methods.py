"""The compared methods behind one call: a batch of slices x [B,1,H,W] -> anomaly maps [B,H,W] + token scores [B,N].

    mimood            the MIM-OOD loop (`mimood.restore.restore`) with the ATD as detector, threshold lam
    mimood_paper      the same loop with an ATD trained the paper's way (brush strokes of random codes, `atd_paper/`,
                      mimood-train atd_paper) at the configured lambda (the paper's 0.005)
    mvtm_likelihood   the same loop with the MVTM likelihood (NLL) as detector, threshold lam in NLL units
    token_critic      the same loop with a Token Critic as detector (needs `<run>/critic/`, see token_critic.py)
    ar                AR restoration (LSR), resample where NLL > lam_nll
    intensity         the image itself
    dae               the denoising-autoencoder baseline (mimood.models.dae; `dae/`, mimood-train dae): |x - DAE(x)|
                      smoothed and masked like the restoration residual

All restoration methods share one VQ-VAE and one `DecodeScore` (min-pool, average pool, brain mask, mean over R),
so they differ only in how they pick and re-draw tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from mimood.config import RestoreConfig
from mimood.eval.baselines import MVTMLikelihood, ar_nll, ar_restore
from mimood.eval.token_critic import CRITIC
import torch

from mimood.models.graphs import ATDGraph, smooth_residual
from mimood.models.checkpoint import load_model
from mimood.restore import intensity_token_scores, restore, scan_lambda
from mimood.runtime.torch_backend import TorchEngine

METHODS = ("mimood", "mimood_paper", "ar", "mvtm_likelihood", "token_critic", "intensity", "dae",
           "mimood_intensity")
MODELS = {"mimood": ("vqvae", "atd", "mvtm"), "mimood_paper": ("vqvae", "atd_paper", "mvtm"),
          "mvtm_likelihood": ("vqvae", "atd", "mvtm"), "ar": ("vqvae", "atd", "mvtm", "ar"),
          "token_critic": ("vqvae", "atd", "mvtm", CRITIC), "intensity": (), "dae": ("dae",),
          "mimood_intensity": ("vqvae", "atd", "mvtm")}


@dataclass
class MethodOutput:
    maps: np.ndarray            # [B, H, W] float32 anomaly maps (0 outside the brain)
    token_scores: np.ndarray    # [B, N] float32 token scores of the input tokens (higher = more anomalous)


class Method(Protocol):
    name: str
    lam: float | None           # the token threshold it restores with (None: no restoration)

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> MethodOutput: ...


class RestoreMethod:
    """MIM-OOD, or the MVTM-likelihood baseline when the engine's detector is `MVTMLikelihood`."""

    def __init__(self, name: str, engine: TorchEngine, cfg: RestoreConfig, lam: float, detector: str = "atd"):
        self.name, self.engine, self.cfg, self.lam = name, engine, replace(cfg, detector=detector), lam
        self.scan_lam: float | None = None

    def begin_scan(self, images: np.ndarray) -> None:
        """The next calls restore slices of the scan whose slices are images [S, H, W]: its own lambda, as the
        runtime gives it (`scan_lambda`; lam itself unless cfg.lam_scan_percentile is set)."""
        self.scan_lam = scan_lambda(images, self.cfg, self.lam)

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> MethodOutput:
        r = restore(self.engine, x, self.cfg, rng, lam=self.lam if self.scan_lam is None else self.scan_lam)
        return MethodOutput(r.maps, r.token_scores)


class IntensityRestoreMethod(RestoreMethod):
    """Ablation `mimood_intensity` (shipped in the bundled model): the loop with detector "intensity", the mean
    intensity of each 8 x 8 block instead of the ATD; the MVTM re-samples the tokens above lambda, the map is the
    usual smoothed residual. Bright healthy tissue (CSF) should come back as itself from its context, a tumour
    as healthy tissue."""

    def __init__(self, engine: TorchEngine, cfg: RestoreConfig, lam: float):
        super().__init__("mimood_intensity", engine, cfg, lam, detector="intensity")


class ARMethod:
    """LSR restoration with the AR transformer; token score = NLL of the input tokens given their prefix."""

    def __init__(self, engine: TorchEngine, ar, lam_nll: float):
        self.name, self.engine, self.ar, self.lam = "ar", engine, ar.to(engine.device).eval(), lam_nll

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> MethodOutput:
        e = self.engine
        xd = e.put(np.ascontiguousarray(x, dtype=np.float32))
        tokens = e.encode(xd)                                                # [B, N]
        rows = e.repeat(tokens)                                              # [B*R, N]
        noise = e.put(rng.random(tuple(rows.shape), dtype=np.float32))
        restored, _ = ar_restore(self.ar, rows, noise, self.lam)
        return MethodOutput(e.get(e.decode_score(restored, xd)), e.get(ar_nll(self.ar, tokens)))


class DAEMethod:
    """The denoising autoencoder: map = smoothed |x - DAE(x)| inside the brain (R = 1: it is deterministic);
    token score = the map's mean over each token's pixels."""
    name, lam = "dae", None

    def __init__(self, dae, cfg: RestoreConfig):
        self.dae, self.cfg = dae.eval(), cfg

    @torch.no_grad()
    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> MethodOutput:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        maps = smooth_residual((self.dae(xt).float() - xt).abs(), xt, 1, self.cfg.min_pool, self.cfg.avg_pool)
        maps = maps.numpy()
        return MethodOutput(maps, intensity_token_scores(maps[:, None]))


class IntensityMethod:
    name, lam = "intensity", None

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> MethodOutput:
        return MethodOutput(np.ascontiguousarray(x[:, 0], dtype=np.float32), intensity_token_scores(x))


def available_methods(run: str | Path) -> tuple[str, ...]:
    """Every method the run can evaluate: those whose checkpoints it has (the AR baseline only after
    `mimood-train ar`, token_critic only once `<run>/critic/` has been trained)."""
    return tuple(m for m in METHODS if all((Path(run) / k / "best.safetensors").exists() for k in MODELS[m]))


def load_models(run: Path, names) -> dict:
    """The best checkpoints the given methods need (plus the VQ-VAE, which tokenises for every table), by folder."""
    kinds = {"vqvae"} | {k for n in names for k in MODELS[n]}
    return {k: load_model(Path(run) / k / "best.safetensors")[0] for k in sorted(kinds)}


def build_methods(models: dict, names, cfg: RestoreConfig, lams: dict[str, float], mvtm_stride: int = 2
                  ) -> dict[str, Method]:
    """Method objects by name. lams: {"mimood": lambda, "mvtm_likelihood": NLL threshold, "ar": lambda_NLL,
    "token_critic": critic probability threshold}."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    out: dict[str, Method] = {}
    engine = None
    if any(n in ("mimood", "ar", "mimood_intensity") for n in names):     # the run's own ATD engine
        engine = TorchEngine(models["vqvae"], models["atd"], models["mvtm"], cfg)
    for n in names:
        if n == "mimood":
            out[n] = RestoreMethod(n, engine, cfg, lams[n])
        elif n == "mimood_paper":
            paper_engine = TorchEngine(models["vqvae"], models["atd_paper"], models["mvtm"], cfg)
            out[n] = RestoreMethod(n, paper_engine, cfg, lams[n])
        elif n == "dae":
            out[n] = DAEMethod(models["dae"], cfg)
        elif n == "mvtm_likelihood":
            nll_engine = TorchEngine(models["vqvae"], models["atd"], models["mvtm"], cfg,
                                     detector=MVTMLikelihood(models["mvtm"], mvtm_stride))
            out[n] = RestoreMethod(n, nll_engine, cfg, lams[n])
        elif n == "token_critic":
            critic_engine = TorchEngine(models["vqvae"], models["atd"], models["mvtm"], cfg,
                                        detector=ATDGraph(models[CRITIC]))
            out[n] = RestoreMethod(n, critic_engine, cfg, lams[n])
        elif n == "ar":
            out[n] = ARMethod(engine, models["ar"], lams[n])
        elif n == "mimood_intensity":
            out[n] = IntensityRestoreMethod(engine, cfg, lams[n])
        else:
            out[n] = IntensityMethod()
    return out
