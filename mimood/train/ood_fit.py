"""Fit the scan-level OOD statistics of a trained run on its healthy training tokens (issue #7).

    fit_ood(run) -> metadata dict, and writes <run>/ood.safetensors

1. Features h of the un-augmented training slices (tokens.npz "train"[0]) with the run's best MVTM, one pass
   type (mimood.ood.features), streamed in batches.
2. Fit set: brain tokens (fg >= fg_min) of those slices, a seeded uniform subsample of at most
   `max_fit_tokens` (a few 1e5 tokens estimate a d x d covariance well for d <= 512).
3. ViM: the principal dimension D is picked from `dim_shares` x d on the validation volumes, with synthetic
   anomalies: brush-stroke regions of the validation tokens replaced by random codes (the ATD's corruption);
   the D whose ViM token score best separates changed from unchanged brain tokens (AUROC) wins. No test scan
   is ever used. alpha comes from the fit set (mimood.ood.scores.fit_vim).
4. Code-conditional Mahalanobis on the observed codes, shrunk toward the global mean (tau).
5. KNN bank: the pooled feature of every training slice, with its axial position bin.
6. Atlas: each token score's healthy mean and spread per (axial position bin, grid position) over the brain
   tokens of all training slices (mimood.ood.atlas), from a second pass over the features. `mirror` has none:
   its reference is the other hemisphere (mimood.ood.mirror).
7. Reference: every scan score of each validation volume (never fitted on), so a new scan's score can be
   reported as a z-score or percentile of healthy scans; `mirror` uses the validation slices' mirror images,
   encoded by the run's VQ-VAE.

All statistics are computed in float64 by mimood.ood.scores; the only randomness (subsample, synthetic
anomalies) is seeded, so a fit is deterministic.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from mimood.config import GRID, RunConfig
from mimood.contract import file_sha256
from mimood.contract import atomic_write
from mimood.data.slices import load_slice_set
from mimood.errors import InputError
from mimood.models.checkpoint import load_model
from mimood.models.masks import atd_masks, corrupt
from mimood.ood.atlas import AtlasFit, position_bins
from mimood.ood.features import PASSES, FeatureGraph, head_weights, mvtm_features
from mimood.ood.mirror import mirror_slices
from mimood.ood.scan import (NORMALISED, OOD_FILE, SLICE_SCORES, Aggregation, OODScorer, brain_tokens,
                             pooled_features)
from mimood.ood.scores import fit_knn, fit_mahalanobis, fit_vim, stats_to_tensors, vim_score


@dataclass
class OODFitConfig:
    pass_type: str = "unmasked"                 # "unmasked" or "masked" (mimood.ood.features)
    max_fit_tokens: int = 300_000               # brain tokens in the fit set (seeded subsample)
    dim_shares: tuple[float, ...] = (0.25, 0.5, 0.75)   # ViM D candidates, as shares of the width d
    tau: float = 50.0                           # Mahalanobis shrinkage of rare codes' means
    knn_k: int = 5                              # KNN: distance to the k-th nearest training slice
    scan_score: str = "mirror"                  # the scan OOD score (best on held-out BraTS: benchmarks/results/ood.md)
    seed: int = 0
    aggregation: Aggregation = field(default_factory=Aggregation)
    batch: int = 128                            # slices per MVTM batch
    exclude: tuple[str, ...] = ()               # training volumes (names) left out of every statistic: for
                                                # evaluating on volumes whose healthy slices were trained on


def _load_tokens(run: Path) -> dict[str, np.ndarray]:
    path = run / "data" / "tokens.npz"
    if not path.exists():
        raise InputError(path, "no cached tokens (train the MVTM first: mimood-train mvtm)")
    with np.load(path) as z:
        missing = {"train", "fg_train", "val", "fg_val"} - set(z.files)
        if missing:
            raise InputError(path, f"token cache lacks {sorted(missing)}")
        return {k: z[k] for k in ("train", "fg_train", "val", "fg_val")}


def _slice_info(run: Path, split: str, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Volume id, slice index in its volume (the order of tokens.npz "train"[v] / "val") and volume names."""
    path = run / "data" / f"{split}_slices.npz"
    if not path.exists():
        raise InputError(path, "slice cache not found")
    with np.load(path) as z:
        case, index, names = z["case"], z["index"], [str(x) for x in z["names"]]
    if len(case) != n:
        raise InputError(path, f"{len(case)} {split} slices but {n} token rows")
    return case, index, names


def _bins_by_case(case: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Axial position bin [S] of each slice within its volume, from its slice index."""
    bins = np.empty(len(case), np.int64)
    for c in np.unique(case):
        rows = np.flatnonzero(case == c)
        bins[rows] = position_bins(index[rows])
    return bins


def _fit_selection(fg: np.ndarray, fg_min: float, max_tokens: int, seed: int) -> np.ndarray:
    """[S, N] bool: a seeded uniform subsample of at most max_tokens brain tokens."""
    brain = np.asarray(fg, dtype=np.float32) >= fg_min
    idx = np.flatnonzero(brain)
    if idx.size == 0:
        raise ValueError(f"no training token has a brain share >= {fg_min}")
    if idx.size > max_tokens:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_tokens, replace=False))
    sel = np.zeros(brain.size, bool)
    sel[idx] = True
    return sel.reshape(brain.shape)


def _synthetic_anomalies(val: np.ndarray, num_codes: int, cfg: RunConfig, seed: int):
    """Validation tokens with brush-stroke regions replaced by random codes: (tokens [M, N], changed [M, N])."""
    rng = np.random.default_rng(seed)
    masks = atd_masks(rng, len(val), GRID, cfg.masks)                        # [M, N] bool
    corrupted, changed = corrupt(torch.from_numpy(val.astype(np.int64)), masks, num_codes,
                                 torch.Generator().manual_seed(seed))
    return corrupted.numpy(), changed.numpy().astype(bool)


def _mirror_val_tokens(run: Path, batch: int) -> np.ndarray:
    """Tokens [M, N] of the left-right mirrored validation slices, encoded by the run's best VQ-VAE (the slice
    cache's rows were matched with the token rows by `_slice_info`)."""
    from mimood.models.graphs import encode_slices
    images = load_slice_set(run / "data" / "val_slices.npz").images
    vqvae, _ = load_model(run / "vqvae" / "best.safetensors")
    with torch.no_grad():
        return encode_slices(vqvae.eval(), mirror_slices(images.astype(np.float32)), batch)


def fit_ood(run: str | Path, cfg: OODFitConfig | None = None, out: str | Path | None = None,
            progress: bool = True) -> dict:
    """Fit every OOD score on the run's healthy training tokens and write `out` (default <run>/ood.safetensors).

    Returns the metadata stored with the statistics (also readable as OODScorer.load(...).meta).
    """
    t0 = time.time()
    run = Path(run)
    cfg = cfg or OODFitConfig()
    if cfg.pass_type not in PASSES:
        raise ValueError(f"pass_type must be one of {PASSES}, got {cfg.pass_type!r}")
    if cfg.scan_score not in SLICE_SCORES:
        raise ValueError(f"scan_score must be one of {SLICE_SCORES}, got {cfg.scan_score!r}")
    mvtm_path = run / "mvtm" / "best.safetensors"
    if not mvtm_path.exists():
        raise InputError(mvtm_path, "no trained MVTM in this run")
    run_cfg = RunConfig.load(run / "config.json")
    mvtm, _ = load_model(mvtm_path)
    graph = FeatureGraph(mvtm, cfg.pass_type)
    W, b = head_weights(mvtm)
    K, d = W.shape
    agg = cfg.aggregation
    tok = _load_tokens(run)
    train, fg_train = tok["train"][0], tok["fg_train"]                      # [S, N] variant 0 = un-augmented
    val, fg_val = tok["val"], tok["fg_val"]
    val_case, val_index, _ = _slice_info(run, "val", len(val))
    train_case, train_index, names = _slice_info(run, "train", len(train))
    keep = ~np.isin(np.asarray(names)[train_case], list(cfg.exclude))
    if not keep.any():
        raise ValueError("every training volume is excluded")
    train, fg_train, train_case, train_index = train[keep], fg_train[keep], train_case[keep], train_index[keep]
    train_bins = _bins_by_case(train_case, train_index)

    # 1-2, 5: stream the training slices once: fit tokens and pooled slice features
    select = _fit_selection(fg_train, agg.fg_min, cfg.max_fit_tokens, cfg.seed)
    train_mask = brain_tokens(fg_train, agg.fg_min)
    h_fit, z_fit, pooled = [], [], []
    for i in tqdm(range(0, len(train), cfg.batch), desc=f"OOD features ({cfg.pass_type})", unit="batch",
                  disable=not progress):
        sl = slice(i, i + cfg.batch)
        h = mvtm_features(graph, train[sl], cfg.batch)                       # [B, N, d]
        h_fit.append(h[select[sl]])
        z_fit.append(train[sl][select[sl]].astype(np.int64))
        pooled.append(pooled_features(h, train_mask[sl]))
    h_fit, z_fit = np.concatenate(h_fit), np.concatenate(z_fit)             # [n, d], [n]

    # 3: ViM with D chosen on synthetic anomalies in the validation volumes
    bad_val, changed = _synthetic_anomalies(val, K, run_cfg, cfg.seed)
    h_bad = mvtm_features(graph, bad_val, cfg.batch)
    val_mask = brain_tokens(fg_val, agg.fg_min)
    logits_bad = h_bad[val_mask].astype(np.float64) @ W.T + b
    sweep = {}
    failed = []
    for share in cfg.dim_shares:
        D = int(round(share * d))
        try:
            stats = fit_vim(h_fit, W, b, dim=D)
        except ValueError as e:                                              # e.g. no residual beyond this D
            failed.append(f"D={D}: {e}")
            continue
        sweep[D] = float(roc_auc_score(changed[val_mask], vim_score(h_bad[val_mask], logits_bad, stats)))
    if not sweep:
        raise ValueError(f"ViM cannot be fitted on these features ({'; '.join(failed)})")
    D = max(sweep, key=lambda k: (sweep[k], -abs(k - d // 2)))              # ties: closest to d/2
    vim = fit_vim(h_fit, W, b, dim=D)

    # 4: code-conditional Mahalanobis
    maha = fit_mahalanobis(h_fit, z_fit, K, tau=cfg.tau)
    knn = fit_knn(np.concatenate(pooled), k=cfg.knn_k, bins=train_bins)
    scorer = OODScorer(vim=vim, mahalanobis=maha, knn=knn, atlas={}, W=W, b=b, meta={})

    # 6: the healthy position atlas of every token score (second pass over the training features)
    fits = {name: AtlasFit(train.shape[1]) for name in NORMALISED}
    for i in tqdm(range(0, len(train), cfg.batch), desc="OOD atlas", unit="batch", disable=not progress):
        sl = slice(i, i + cfg.batch)
        scores = scorer.token_scores(mvtm_features(graph, train[sl], cfg.batch), train[sl])
        for name, s in scores.items():
            fits[name].add(s, train_mask[sl], train_bins[sl])
    scorer.atlas = {name: f.finish() for name, f in fits.items()}

    meta = {"pass_type": cfg.pass_type, "aggregation": asdict(agg), "scan_score": cfg.scan_score,
            "mvtm_sha256": file_sha256(mvtm_path),
            "fit": {"tokens": int(len(h_fit)), "slices": int(len(train)), "width": d, "codes": K, "D": D,
                    "dim_sweep_auroc": {str(k): v for k, v in sweep.items()}, "tau": cfg.tau,
                    "knn_k": cfg.knn_k, "knn_bank": int(len(knn.bank)), "seed": cfg.seed,
                    "excluded": list(cfg.exclude)},
            "reference": {}}
    scorer.meta = meta

    # 7: healthy reference scan scores of the validation volumes
    h_val = mvtm_features(graph, val, cfg.batch)
    h_val_mirror = mvtm_features(graph, _mirror_val_tokens(run, cfg.batch), cfg.batch)
    ref = {name: [] for name in SLICE_SCORES}
    for c in np.unique(val_case):
        rows = val_case == c
        res = scorer.scores_from_features(h_val[rows], val[rows], fg_val[rows], index=val_index[rows],
                                          h_mirror=h_val_mirror[rows])
        for name in SLICE_SCORES:
            ref[name].append(res.scan[name])
    meta["reference"] = ref
    meta["fit"]["seconds"] = round(time.time() - t0, 1)

    tensors = stats_to_tensors({"vim": vim, "mahalanobis": maha, "knn": knn})
    tensors["head/W"], tensors["head/b"] = W, b
    for name, atlas in scorer.atlas.items():
        tensors[f"atlas/{name}/mean"], tensors[f"atlas/{name}/std"] = atlas.mean, atlas.std
    out = Path(out) if out is not None else run / OOD_FILE
    with atomic_write(out) as tmp:
        save_file(tensors, str(tmp), metadata={"ood": json.dumps(meta)})
    return meta


def add_reference_scans(run: str | Path, folders, progress: bool = True) -> dict:
    """More healthy reference scans for the scan score's calibration: every volume under `folders` (healthy
    scans the run did not train on, e.g. held-out synthetic subjects) is preprocessed like inference, scored with
    the run's fitted statistics, and its scan scores appended to the fit's `reference` (beside the validation
    volumes'). The [0,1] scan score and the z-score/percentile of mimood-infer are computed against these
    references (z and percentile need at least 20). Already added volumes are skipped. Returns the metadata."""
    from safetensors.numpy import load_file

    from mimood.data.discover import discover
    from mimood.data.preprocess import preprocess
    from mimood.models.graphs import encode_slices
    from mimood.ood.scan import brain_share

    run = Path(run)
    file = run / OOD_FILE
    scorer = OODScorer.load(file)
    meta = scorer.meta
    cfg = RunConfig.load(run / "config.json")
    vqvae, _ = load_model(run / "vqvae" / "best.safetensors")
    sources = meta.setdefault("reference_sources", {"validation volumes": len(meta["reference"][SLICE_SCORES[0]]),
                                                    "extra": []})
    cases = [c for d in folders for c in discover(d, modality=cfg.data.modality)]
    for case in tqdm(cases, desc="OOD reference scans", unit="volume", disable=not progress):
        if str(case.image) in sources["extra"]:
            continue
        s = preprocess(case.image, cfg.data)
        with torch.no_grad():
            tokens = encode_slices(vqvae, s.images, 32)
            mirrored = encode_slices(vqvae, mirror_slices(s.images), 32)
        res = scorer.scores_from_features(scorer.features(tokens), tokens, brain_share(s.images > 0),
                                          index=s.index, h_mirror=scorer.features(mirrored))
        for name in SLICE_SCORES:
            meta["reference"][name].append(res.scan[name])
        sources["extra"].append(str(case.image))
    tensors = load_file(str(file))
    with atomic_write(file) as tmp:
        save_file(tensors, str(tmp), metadata={"ood": json.dumps(meta)})
    return meta
