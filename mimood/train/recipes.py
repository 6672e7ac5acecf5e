"""What `mimood-train` runs: build the slice cache, train the VQ-VAE, tokenise once, train MVTM / ATD / AR, and
fit the scan-level OOD statistics on the MVTM's features (mimood.ood.fit; the last stage of `all`).

Run folder layout (self-describing; `--resume` continues a killed run):
    run/config.json                    resolved RunConfig
    run/data/{train,val}_slices.npz    preprocessed slices (held-out volumes for validation)
    run/data/tokens.npz                cached tokens: augmented train variants + val
    run/data/lesion_tokens.npz         ATD synthetic-lesion corruptions (only when masks.lesion_share > 0)
    run/<model>/{last,best}.safetensors, state.pt, log.jsonl
    run/ood.safetensors                OOD statistics of the best MVTM (ViM, Mahalanobis, KNN, atlas)
    run/summary.json                   validation metrics and wall time per model
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mimood.config import RunConfig
from mimood.data.augment import intensity_augment, spatial_augment
from mimood.data.discover import discover
from mimood.data.io import atomic_write
from mimood.data.slices import (SliceSet, build_slice_set, load_slice_set, save_slice_set, source_balance,
                                split_by_case)
from mimood.models.checkpoint import build_model, load_model
from mimood.ood.scan import brain_share
from mimood.train import objectives
from mimood.train.trainer import Trainer, TrainResult, world

MODELS = ("vqvae", "mvtm", "atd", "ar")
STAGES = MODELS + ("ood",)  # "all" runs these in this order
BASELINES = ("dae", "atd_paper")   # comparison models for mimood-eval, trained on the same slices when asked:
                                   # the denoising autoencoder, and an ATD trained the paper's way (random codes)
TOKEN_VARIANTS = 4          # identity, flip, and two random flip/rotations per training slice
LESION_VARIANTS = 2         # synthetic-lesion corruptions per training slice (on the identity and flip variants)


def log(msg: str) -> None:
    if world()[0] == 0:
        tqdm.write(msg)


def default_demo_data(run: Path) -> Path:
    """The built-in demo data (generated once into the run folder) when no --data is given."""
    from mimood.data.demo import make_demo
    out = run / "demo_data"
    if not (out / "demo.json").exists():
        if world()[0] == 0:
            log(f"no --data given: generating the built-in demo data in {out}")
            make_demo(out)
        if world()[1] > 1:
            torch.distributed.barrier()
    return out / "train"


def prepare_slices(run: Path, cfg: RunConfig, data: Sequence[Path], val_fraction: float = 0.15,
                   progress: bool = True) -> tuple[SliceSet, SliceSet]:
    """Preprocess every training volume once into run/data/{train,val}_slices.npz."""
    train_p, val_p = run / "data" / "train_slices.npz", run / "data" / "val_slices.npz"
    if not (train_p.exists() and val_p.exists()) and world()[0] == 0:
        found = [discover(d, modality=cfg.data.modality) for d in data]      # one source per --data
        for d, f in zip(data, found):              # a lesion scan without its label would train as healthy
            unlabelled = [c for c in f if c.label is None]
            if cfg.data.lesion_margin > 0 and unlabelled and len(unlabelled) < len(f):
                log(f"warning: {d}: {len(unlabelled)} volume(s) without a label are used as healthy scans: "
                    + ", ".join(str(c.image) for c in unlabelled[:3]))
        cases = [c for f in found for c in f]
        sources = [j for j, f in enumerate(found) for _ in f]
        weights = list(cfg.data.source_weights) or None
        if weights is not None and len(weights) != len(data):
            raise ValueError(f"{len(weights)} source weights for {len(data)} --data sources")
        slices, failures = build_slice_set(cases, cfg.data, progress=progress, sources=sources,
                                           source_weights=weights)
        for f in failures:
            log(f"skipped {f}")
        if len(slices.names) < 2:
            raise ValueError(f"need at least 2 usable training volumes, found {len(slices.names)}")
        train, val = split_by_case(slices, val_fraction, cfg.seed)
        train.weight = source_balance(train, weights)   # the shares asked for, over the training volumes
        train_p.parent.mkdir(parents=True, exist_ok=True)
        save_slice_set(train, train_p)
        save_slice_set(val, val_p)
        log(f"slices: {len(train.images)} train from {len(set(train.case.tolist()))} volumes, "
            f"{len(val.images)} validation from {len(set(val.case.tolist()))} volumes"
            + (f", {int(slices.mirrored.sum())} of them mirrored lesion-free hemispheres"
               if slices.mirrored is not None and slices.mirrored.any() else ""))
    if world()[1] > 1:
        torch.distributed.barrier()
    return load_slice_set(train_p), load_slice_set(val_p)


def train_vqvae(run: Path, cfg: RunConfig, train: SliceSet, val: SliceSet, resume: bool,
                progress: bool = True) -> TrainResult:
    model = build_model("vqvae", cfg.vqvae)
    o = cfg.optim_vqvae
    trainer = Trainer(model, "vqvae", o, run / "vqvae", cfg.seed,
                      after_step=lambda m, step: m.after_step(step))
    if resume and trainer.resume():
        log(f"vqvae: resuming at step {trainer.step}")
    loss_fn, val_fn = objectives.vqvae_objective(train.images, val.images, o.batch_size, o.val_batches,
                                                 p=train.probabilities())
    return trainer.fit(loss_fn, val_fn, progress)


@torch.no_grad()
def tokenize(run: Path, cfg: RunConfig, train: SliceSet, val: SliceSet, progress: bool = True,
             batch: int = 64) -> dict[str, np.ndarray]:
    """Encode the slices once with the best VQ-VAE: train tokens [V, N, 400] for V augmented variants
    (flips and small rotations, the paper's augmentation of the latent models; with `data.token_intensity_aug`
    the random variants also get the VQ-VAE's intensity augmentation, so the token models learn other contrasts
    too), val tokens [M, 400], and the share of brain pixels under each token (fg_*: used to keep brain tokens
    only)."""
    path = run / "data" / "tokens.npz"
    vq_path = run / "vqvae" / "best.safetensors"
    digest = hashlib.sha256(vq_path.read_bytes()).hexdigest()
    key = f"{digest}/aug={int(cfg.data.token_intensity_aug)}"
    if path.exists() and str(np.load(path)["vqvae_sha256"]) in (digest, key):   # plain digest: caches before aug
        return dict(np.load(path))                 # cached tokens of this very tokenizer
    if world()[0] == 0:
        vq, _ = load_model(vq_path)
        gen = torch.Generator().manual_seed(cfg.seed)

        def encode(images: np.ndarray, variant: int) -> np.ndarray:
            out = []
            for i in range(0, len(images), batch):
                x = torch.from_numpy(images[i:i + batch].astype(np.float32))[:, None]
                if variant == 1:
                    x = torch.flip(x, dims=[-1])
                elif variant > 1:
                    x = spatial_augment(x, gen)
                    if cfg.data.token_intensity_aug:
                        x = intensity_augment(x, gen)
                out.append(vq.encode(x).flatten(1).to(torch.int16).numpy())
                bar.update(len(x))
            return np.concatenate(out)

        with tqdm(total=len(train.images) * TOKEN_VARIANTS + len(val.images), desc="tokenise", unit="slice",
                  disable=not progress) as bar:
            tokens = {"train": np.stack([encode(train.images, v) for v in range(TOKEN_VARIANTS)]),
                      "val": encode(val.images, 0), "vqvae_sha256": np.array(key)}
        for name, s in (("train", train), ("val", val)):
            tokens[f"fg_{name}"] = brain_share(s.images > 0).astype(np.float16)     # [S, 400]
        with atomic_write(path) as tmp:
            np.savez(tmp, **tokens)
    if world()[1] > 1:
        torch.distributed.barrier()
    return dict(np.load(path))


@torch.no_grad()
def lesion_cache(run: Path, cfg: RunConfig, train: SliceSet, val: SliceSet, tokens: dict[str, np.ndarray],
                 progress: bool = True) -> dict[str, np.ndarray]:
    """Synthetic lesions painted into the slices and encoded once with the best VQ-VAE (mimood.train.lesions):
    train [LESION_VARIANTS * N, 400] corrupted tokens + train_target, val [M, 400] + val_target; cached in
    run/data/lesion_tokens.npz under the tokenizer's hash like the clean tokens."""
    from mimood.models.lesions import VERSION, lesion_tokens

    path = run / "data" / "lesion_tokens.npz"
    digest = str(tokens["vqvae_sha256"])
    aug = cfg.data.token_intensity_aug
    key = f"{VERSION}/{LESION_VARIANTS}" + ("/aug" if aug else "")   # a changed generator is a stale cache too
    if path.exists():
        with np.load(path) as z:
            if str(z["vqvae_sha256"]) == digest and str(z.get("generator", "")) == key:
                return dict(z)
    if world()[0] == 0:
        vq, _ = load_model(run / "vqvae" / "best.safetensors")
        rng = np.random.default_rng([cfg.seed, 7])
        flipped = train.images[:, :, ::-1]                       # variant 1 of the clean tokens is the flip
        clean = [tokens["train"][0], tokens["train"][1]]
        if aug:                      # the flip variant in another contrast (its clean codes encoded anew)
            flipped, clean[1] = _intensity_variant(vq, flipped, torch.Generator().manual_seed(cfg.seed + 7))
        with tqdm(total=len(train.images) * LESION_VARIANTS + len(val.images), desc="synthetic lesions",
                  unit="slice", disable=not progress) as bar:
            parts = [lesion_tokens(vq, imgs, clean[v], rng, bar=bar)
                     for v, imgs in enumerate((train.images, flipped)[:LESION_VARIANTS])]
            val_tok, val_target = lesion_tokens(vq, val.images, tokens["val"], rng, bar=bar)
        out = {"train": np.concatenate([p[0] for p in parts]), "train_target": np.concatenate([p[1] for p in parts]),
               "val": val_tok, "val_target": val_target, "vqvae_sha256": np.array(digest), "generator": np.array(key)}
        with atomic_write(path) as tmp:
            np.savez(tmp, **out)
        log(f"synthetic lesions: {out['train_target'].mean():.1%} of training tokens changed by a lesion")
    if world()[1] > 1:
        torch.distributed.barrier()
    return dict(np.load(path))


def _intensity_variant(vq, images: np.ndarray, gen: torch.Generator, batch: int = 64
                       ) -> tuple[np.ndarray, np.ndarray]:
    """images [N, H, W] with the VQ-VAE's intensity augmentation (float32) and their tokens [N, 400] int16."""
    out, tok = [], []
    for i in range(0, len(images), batch):
        x = intensity_augment(torch.from_numpy(images[i:i + batch].astype(np.float32))[:, None], gen)
        out.append(x[:, 0].numpy())
        tok.append(vq.encode(x).flatten(1).to(torch.int16).numpy())
    return np.concatenate(out), np.concatenate(tok)


def train_dae(run: Path, cfg: RunConfig, train: SliceSet, val: SliceSet, resume: bool,
              progress: bool = True) -> TrainResult:
    """The denoising-autoencoder baseline (mimood.models.dae) on the run's own training slices and weights."""
    model = build_model("dae", cfg.dae)
    o = cfg.optim_dae
    trainer = Trainer(model, "dae", o, run / "dae", cfg.seed)
    if resume and trainer.resume():
        log(f"dae: resuming at step {trainer.step}")
    loss_fn, val_fn = objectives.dae_objective(train.images, val.images, o.batch_size, o.val_batches, cfg.dae,
                                               p=train.probabilities())
    return trainer.fit(loss_fn, val_fn, progress)


def train_transformer(task: str, run: Path, cfg: RunConfig, tokens: dict[str, np.ndarray], resume: bool,
                      progress: bool = True, lesions: dict[str, np.ndarray] | None = None,
                      p: np.ndarray | None = None, out: str | None = None) -> TrainResult:
    """p [N]: sampling probabilities of the training slices (SliceSet.probabilities; None: uniform), spread over
    the token variants of each slice. out: the checkpoint folder's name (default: the task)."""
    model = build_model(task, cfg.transformer)
    o = cfg.optim_transformer
    train_tok = tokens["train"].reshape(-1, tokens["train"].shape[-1])     # [V*N, 400]
    V = tokens["train"].shape[0]
    p_tok = None if p is None else np.tile(p, V) / V                      # variant-major, like the reshape
    p_les = None if p is None or lesions is None else \
        np.tile(p, len(lesions["train"]) // len(p)) / (len(lesions["train"]) // len(p))
    val_tok = tokens["val"]
    trainer = Trainer(model, task, o, run / (out or task), cfg.seed)
    if resume and trainer.resume():
        log(f"{out or task}: resuming at step {trainer.step}")
    if task == "mvtm":
        fns = objectives.mvtm_objective(train_tok, val_tok, o.batch_size, o.val_batches, cfg.masks, p=p_tok)
    elif task == "atd":
        K = cfg.vqvae.num_embeddings
        prior = None if cfg.masks.corruption == "uniform" else objectives.code_prior(
            tokens["train"], np.broadcast_to(tokens["fg_train"], tokens["train"].shape), K)
        fns = objectives.atd_objective(train_tok, val_tok, o.batch_size, o.val_batches, cfg.masks, K,
                                       code_probs=prior, lesions=lesions, p=p_tok, lesion_p=p_les)
    else:
        fns = objectives.ar_objective(train_tok, val_tok, o.batch_size, o.val_batches, p=p_tok)
    return trainer.fit(*fns, progress=progress)


def train(what: str, run: str | Path, cfg: RunConfig, data: Sequence[str | Path] = (), resume: bool = False,
          progress: bool = True, reference: Sequence[str | Path] = ()) -> dict:
    """Train `what` in {vqvae, mvtm, atd, ar, ood, all} or a baseline {dae, atd_paper} into `run`; returns the
    summary dict. `reference`: folders of healthy scans the run does not train on, scored after the OOD fit as
    extra reference scans of the scan score (mimood.train.ood_fit.add_reference_scans)."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    cfg_path = run / "config.json"
    if cfg_path.exists() and resume:
        cfg = RunConfig.load(cfg_path)          # resume with exactly the saved configuration
    elif world()[0] == 0:
        cfg.save(cfg_path)
    data = [Path(d) for d in data] or [default_demo_data(run)]
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    t_all = time.time()
    train_set, val_set = prepare_slices(run, cfg, data, progress=progress)
    todo = STAGES if what == "all" else (what,)
    for name in todo:
        if name == "ood":
            summary["ood"] = fit_ood_stage(run, resume, summary.get("ood", {}), progress)
            if reference and world()[0] == 0:              # more healthy reference scans for the scan score
                from mimood.train.ood_fit import add_reference_scans
                meta = add_reference_scans(run, [Path(r) for r in reference], progress)
                summary["ood"]["reference_scans"] = len(meta["reference"][meta["scan_score"]])
            continue
        if name == "vqvae":
            result = train_vqvae(run, cfg, train_set, val_set, resume, progress)
        elif name == "dae":
            result = train_dae(run, cfg, train_set, val_set, resume, progress)
        elif name == "atd_paper":                   # the paper's ATD: brush strokes of uniformly random codes
            if not (run / "vqvae" / "best.safetensors").exists():
                raise ValueError(f"{run}: train the VQ-VAE first (mimood-train vqvae)")
            paper = RunConfig.from_dict(cfg.to_dict())
            paper.masks.lesion_share, paper.masks.corruption = 0.0, "uniform"
            tokens = tokenize(run, cfg, train_set, val_set, progress)
            result = train_transformer("atd", run, paper, tokens, resume, progress, None,
                                       train_set.probabilities(), out="atd_paper")
        else:
            if not (run / "vqvae" / "best.safetensors").exists():
                raise ValueError(f"{run}: train the VQ-VAE first (mimood-train vqvae)")
            tokens = tokenize(run, cfg, train_set, val_set, progress)
            lesions = (lesion_cache(run, cfg, train_set, val_set, tokens, progress)
                       if name == "atd" and cfg.masks.lesion_share > 0 else None)
            result = train_transformer(name, run, cfg, tokens, resume, progress, lesions, train_set.probabilities())
        summary[name] = {"steps": result.steps, "seconds": round(result.seconds, 1), "best": result.best_val,
                         "last": result.last_val}
        log(f"{name}: {result.steps} steps in {result.seconds:.0f} s; validation {_fmt(result.last_val)}")
    summary["wall_seconds_" + what] = round(time.time() - t_all, 1)
    if world()[0] == 0:
        with atomic_write(summary_path) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def fit_ood_stage(run: Path, resume: bool, previous: dict, progress: bool = True) -> dict:
    """Fit the OOD statistics of the run's best MVTM into run/ood.safetensors (rank 0 only); the summary entry.
    With `resume`, statistics already fitted on this very MVTM are kept."""
    from mimood.contract import file_sha256
    from mimood.train.ood_fit import fit_ood
    from mimood.ood.scan import OOD_FILE, OODScorer

    mvtm = run / "mvtm" / "best.safetensors"
    if not mvtm.exists():
        raise ValueError(f"{run}: train the MVTM first (mimood-train mvtm)")
    fitted = resume and previous and (run / OOD_FILE).exists()
    if fitted and OODScorer.load(run / OOD_FILE).meta["mvtm_sha256"] == file_sha256(mvtm):
        log("ood: statistics of this MVTM already fitted")
        return previous
    entry = {}
    if world()[0] == 0:
        meta = fit_ood(run, progress=progress)
        entry = {"seconds": meta["fit"]["seconds"], "scan_score": meta["scan_score"],
                 "pass_type": meta["pass_type"], "tokens": meta["fit"]["tokens"], "D": meta["fit"]["D"]}
        log(f"ood: {entry['tokens']} healthy brain tokens, scan score {entry['scan_score']} "
            f"({entry['pass_type']} pass), {entry['seconds']:.0f} s")
    if world()[1] > 1:
        torch.distributed.barrier()
    return entry


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
