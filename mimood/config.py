"""Configuration dataclasses and the three presets (paper, cpu, tiny).

A run folder stores the resolved `RunConfig` as `config.json`; every checkpoint carries the
config of its own model, so a checkpoint can be rebuilt without the run folder.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

IMAGE_SIZE = 160          # slices are 160 x 160 pixels
DOWNSAMPLE = 8            # VQ-VAE downsampling factor f
GRID = IMAGE_SIZE // DOWNSAMPLE   # 20 x 20 token grid
NUM_TOKENS = GRID * GRID  # 400 tokens per slice


@dataclass
class DataConfig:
    """Preprocessing of a volume into 160 x 160 axial slices (see mimood.data.preprocess)."""
    modality: str = "t2"              # which file of a BraTS-style case to read
    spacing: float = 1.0              # resample to this isotropic voxel size (mm)
    size: int = IMAGE_SIZE            # in-plane crop/pad size
    clip_high: float = 98.0           # upper intensity percentile of brain voxels (paper: 98)
    clip_low: float = 0.0             # lower percentile floor (authors' code used 2; 0 = none)
    min_brain_fraction: float = 0.02  # slices with less brain than this share of size^2 are skipped
    lesion_margin: int = 0            # training: >0 keeps only slices this many mm from any label
    hemispheres: bool = False         # training, with lesion_margin: add the mirrored lesion-free half of the
                                      # other slices (mimood.data.slices)
    hemisphere_margin: float = 5.0    # mm (3-D) between that half's brain and the nearest labelled voxel
    token_intensity_aug: bool = False        # training: the token models also see intensity-augmented slices
                                             # (mimood.train.recipes.tokenize)
    source_weights: tuple[float, ...] = ()   # training: share of the batches of each --data source, in order
                                             # (empty: equal shares; mimood.data.slices.source_balance)


@dataclass
class VQConfig:
    """MONAI VQVAE hyper-parameters: 160 x 160 -> 20 x 20 tokens (three stride-2 levels)."""
    channels: tuple[int, ...] = (128, 256, 256)
    num_res_layers: int = 2
    num_embeddings: int = 256         # codebook size K; [MASK] = K in the transformers
    embedding_dim: int = 256          # D
    commitment_cost: float = 0.25
    decay: float = 0.99               # EMA codebook decay
    dropout: float = 0.0
    dead_code_threshold: float = 0.03  # a code used less than this fraction of the uniform share is dead
    restart_every: int = 20            # steps between dead-code restarts (also at step 1: data-driven init)


@dataclass
class TransformerConfig:
    """One bidirectional (or causal, for AR) pre-LN transformer over the 400 tokens."""
    vocab_size: int = 256             # K; the input vocabulary adds [MASK] (= K)
    seq_len: int = NUM_TOKENS
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    drop_path: float = 0.1            # stochastic depth (paper: 0.1)


@dataclass
class DAEConfig:
    """The denoising-autoencoder baseline (mimood.models.dae): MONAI UNet, coarse-noise corruption."""
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    num_res_units: int = 1
    noise_res: int = 20               # noise drawn on a 20 x 20 grid (the paper: 16 for 128 px, the same ratio)
    noise_std: float = 0.2


@dataclass
class OptimConfig:
    steps: int = 200_000
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 1e-5
    warmup_steps: int = 0
    grad_clip: float = 1.0
    val_every: int = 1000
    val_batches: int = 8
    bf16: bool = False                # CPU autocast in bfloat16 (faster on AVX-512-bf16 CPUs)


@dataclass
class MaskConfig:
    """Brush-stroke masks on the token grid (ATD corruption and MVTM training)."""
    max_strokes: int = 3
    min_vertices: int = 4
    max_vertices: int = 12
    min_width: int = 1                # brush width in tokens
    max_width: int = 4
    brush_share: float = 0.5          # MVTM: share of samples masked with brush strokes, rest cosine random
    clean_share: float = 0.1          # ATD: share of samples left uncorrupted
    corruption: str = "uniform"       # ATD replacement codes: "uniform" (the paper) or "prior" (drawn from the
                                      # healthy brain tokens' code frequencies: plausible codes out of context)
    lesion_share: float = 0.0         # ATD: share of samples corrupted in image space instead (synthetic lesions
                                      # painted into the slice and re-encoded: mimood.train.lesions); 0 = paper


LAM_PERCENTILE = 90.0   # default calibration rule: lambda = this percentile of healthy hold-out ATD token scores
                        # (the reasons and the measurement: mimood.eval.calibrate)


DETECTORS = ("atd", "intensity")      # RestoreConfig.detector, Manifest.detector
RESIDUALS = ("abs", "positive")       # RestoreConfig.residual, Manifest.residual


@dataclass
class RestoreConfig:
    """The MIM-OOD restoration loop (paper 3.4) and its AR baseline."""
    lam: float = 0.005                # ATD threshold lambda
    T: int = 8                        # iterations
    R: int = 4                        # restorations in parallel
    temperature: float = 1.0
    min_pool: int = 3                 # smoothing of |restoration - input|
    avg_pool: int = 7
    batch: int = 32                   # slices per fixed-shape batch
    seed: int = 0
    lam_nll: float = 6.0              # AR baseline: resample tokens whose NLL exceeds this
    threshold: float | None = None    # calibrated anomaly-score threshold for binary masks
    # which token score decides what the loop re-samples (DETECTORS): "atd" (the paper: the ATD on
    # the current tokens) or "intensity" (the mean intensity of each token's 8 x 8 block of the input, fixed over
    # the T iterations; the ablation that beat the ATD on real BraTS tumours, benchmarks/results/crossfit.md)
    detector: str = "atd"
    # "intensity" only: lambda per scan = min(lam, this percentile of the scan's own brain-token intensity scores)
    # (`mimood.restore.scan_lambda`), so at least that share of every scan's brain tokens is re-sampled whatever
    # its intensity scale (another site or preprocessing); None: lam for every scan
    lam_scan_percentile: float | None = None
    # what the map measures (RESIDUALS): "abs" |restoration - input| (the paper), or "positive" max(input -
    # restoration, 0), only where the input is brighter than its restoration (hyperintense anomalies: with the
    # intensity detector it raised pixel AUROC in both cross-fit folds, benchmarks/results/crossfit.md)
    residual: str = "abs"
    # contralateral damping k in [0, 1] (`mimood.restore.contralateral`): map - k * min(map, its left-right
    # mirror), so what both hemispheres share at the same place (ventricles, a bias field's bright band) is damped
    # and a one-sided anomaly keeps its value; 0 = the paper's map
    contralateral: float = 0.0


@dataclass
class RunConfig:
    preset: str = "paper"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    vqvae: VQConfig = field(default_factory=VQConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    optim_vqvae: OptimConfig = field(default_factory=lambda: OptimConfig(
        steps=300_000, batch_size=32, lr=1e-4, weight_decay=0.0, val_every=2000))
    optim_transformer: OptimConfig = field(default_factory=OptimConfig)
    restore: RestoreConfig = field(default_factory=RestoreConfig)
    dae: DAEConfig = field(default_factory=DAEConfig)
    optim_dae: OptimConfig = field(default_factory=lambda: OptimConfig(
        steps=2000, batch_size=16, lr=1e-3, weight_decay=0.0, warmup_steps=50, val_every=250, val_batches=4))

    def __post_init__(self):
        if self.transformer.vocab_size != self.vqvae.num_embeddings:
            raise ValueError(f"transformer.vocab_size ({self.transformer.vocab_size}) must equal "
                             f"vqvae.num_embeddings ({self.vqvae.num_embeddings})")
        if self.masks.corruption not in ("uniform", "prior"):
            raise ValueError(f"masks.corruption must be 'uniform' or 'prior', got {self.masks.corruption!r}")
        if not 0.0 <= self.masks.lesion_share <= 1.0:
            raise ValueError(f"masks.lesion_share must lie in [0, 1], got {self.masks.lesion_share}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return from_dict(cls, d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def from_dict(cls, d: dict[str, Any]):
    """Rebuild a (nested) dataclass from `asdict` output; unknown keys are an error."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs = {}
    for name, value in d.items():
        default = getattr(cls(), name) if _has_defaults(cls) else None
        if is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _has_defaults(cls) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in fields(cls))


def preset(name: str) -> RunConfig:
    """The named preset: `paper` (the paper's sizes), `cpu` (about 20 min of training on 2 cores), `real` (the
    cpu sizes trained longer, for real scans: healthy material from labelled lesion scans (lesion-free slices
    and mirrored hemispheres) and intensity-augmented token models; the bundled model's recipe), `tiny`
    (seconds; tests)."""
    if name == "paper":
        return RunConfig(preset="paper")
    if name == "cpu":
        return RunConfig(
            preset="cpu",
            vqvae=VQConfig(channels=(16, 32, 64), num_res_layers=1, embedding_dim=64),
            transformer=TransformerConfig(width=64, depth=4, heads=4, drop_path=0.0),
            masks=MaskConfig(lesion_share=1.0),     # see mimood.train.lesions: random codes miss real lesions
            optim_vqvae=OptimConfig(steps=1200, batch_size=16, lr=1e-3, weight_decay=0.0,
                                    warmup_steps=50, val_every=200, val_batches=4),
            optim_transformer=OptimConfig(steps=600, batch_size=32, lr=1e-3, weight_decay=1e-5,
                                          warmup_steps=50, val_every=100, val_batches=4),
        )
    if name == "real":
        cfg = preset("cpu")
        cfg.preset = "real"
        cfg.data = DataConfig(lesion_margin=1, hemispheres=True, token_intensity_aug=True)
        cfg.optim_vqvae.steps = 2000
        cfg.optim_transformer.steps = 1200
        cfg.optim_transformer.val_every = 200
        return cfg
    if name == "tiny":
        return RunConfig(
            preset="tiny",
            vqvae=VQConfig(channels=(8, 8, 16), num_res_layers=0, num_embeddings=32, embedding_dim=16),
            transformer=TransformerConfig(vocab_size=32, width=32, depth=2, heads=2, drop_path=0.0),
            masks=MaskConfig(lesion_share=0.5),     # both ATD corruptions, so tests exercise both
            optim_vqvae=OptimConfig(steps=20, batch_size=4, lr=3e-3, weight_decay=0.0,
                                    val_every=10, val_batches=1),
            optim_transformer=OptimConfig(steps=20, batch_size=8, lr=3e-3, weight_decay=0.0,
                                          val_every=10, val_batches=1),
            restore=RestoreConfig(T=2, R=2, batch=4),
            dae=DAEConfig(channels=(4, 8, 8), noise_res=10),
            optim_dae=OptimConfig(steps=10, batch_size=4, lr=3e-3, weight_decay=0.0, val_every=5, val_batches=1),
        )
    raise ValueError(f"unknown preset {name!r}: choose paper, cpu or tiny")


PRESETS = ("paper", "cpu", "real", "tiny")
