"""Healthy T2-like training volumes from whole-head label maps, in the spirit of SynthSeg's domain randomisation
(Billot et al., "SynthSeg: Segmentation of brain MRI scans of any contrast and resolution without retraining",
Medical Image Analysis 2023).

Why: the real healthy T2 material here is one population-average template (smooth, symmetric) and the tumour-free
edges of a few BraTS scans; a model trained on them has never seen the central slices of a real single-subject
brain, so everything there looks anomalous. Label maps of real subjects give real anatomy at every level; random
contrast and acquisition make the model robust to a new site's scanner instead of learning one protocol.

One volume from one label map (`synthesize`), every step drawn from a seeded numpy generator:
1. anatomy: the head brought into a canonical pose (`canonical_rotation`: the maps are native-space, pitched by
   13-75 degrees, where BraTS is atlas-aligned), then a small random rotation and scale and a smooth elastic
   displacement (nearest-neighbour resampling of labels, so no label is invented);
2. skull stripping: labels >= 500 (skull, scalp, eyes...) and background become 0; CSF (label 24) is kept inside
   the tissue's envelope (sulci, cisterns) and in a random shell of 0.5-4 mm around it, like a BraTS brain mask
   (the mask is applied last, so the brain's edge has the partial volume of a real scan, not of a zero border);
   FreeSurfer's small "lesion" labels 25/57 (white-matter hypointensities in the source maps) become white matter;
3. contrast: one mean intensity per structure, drawn in T2 order: white matter lowest, grey matter above it, CSF
   and ventricles brightest (`TISSUES` places every other structure between white and grey matter, or above
   grey matter, by a random fraction), with within-structure texture (smooth multiplicative noise);
4. acquisition: partial-volume blur, optionally thick axial slices (2-6 mm, blurred and re-interpolated to 1 mm,
   as many BraTS scans were acquired and upsampled), a smooth multiplicative bias field, Rician noise and a
   gamma; values >= 1e-3 inside the brain, exactly 0 outside; stored as int16 on the label map's own grid with
   its affine.

What it leaves out on purpose: no skull, no lesion, no pathology; the labels' own resolution (1 mm) is the
finest structure.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from mimood.data.io import atomic_write, load_volume, save_nifti
from mimood.errors import InputError

GENERATOR_VERSION = "2"

# FreeSurfer labels by tissue class. "kind" places a class's mean intensity:
#   ("wm", f)   white matter mean x f (f < 1: darker than white matter)
#   ("mix", f)  white + f * (grey - white), f drawn from the range (deep grey nuclei, brain stem...)
#   ("gm", f)   grey + f * (csf - grey)
#   ("csf", f)  csf x f
TISSUES: dict[str, tuple[tuple[int, ...], tuple[str, tuple[float, float]]]] = {
    "white_matter": ((2, 41, 25, 57, 77, 85), ("wm", (1.0, 1.0))),
    "cerebellum_wm": ((7, 46), ("wm", (0.85, 1.0))),
    "cortex": ((3, 42), ("gm", (0.0, 0.0))),
    "cerebellum_cortex": ((8, 47), ("gm", (-0.1, 0.05))),
    "hippocampus_amygdala": ((17, 18, 53, 54), ("gm", (0.0, 0.15))),
    "caudate_accumbens": ((11, 50, 26, 58), ("mix", (0.55, 0.95))),
    "putamen": ((12, 51), ("mix", (0.4, 0.85))),
    "thalamus": ((10, 49), ("mix", (0.25, 0.7))),
    "pallidum": ((13, 52), ("wm", (0.75, 1.0))),
    "ventral_dc_brainstem": ((28, 60, 16), ("mix", (0.0, 0.5))),
    "vessel": ((30, 62), ("wm", (0.7, 1.0))),
    "choroid_plexus": ((31, 63), ("gm", (0.2, 0.6))),
    "ventricles": ((4, 5, 14, 15, 43, 44, 72), ("csf", (0.9, 1.0))),
    "csf": ((24,), ("csf", (0.9, 1.05))),
}
CSF_LABEL = 24
EXTRA_CEREBRAL = 500          # labels >= this are outside the brain (skull, scalp, eyes, ...)
OTHER = ("mix", (0.3, 0.7))   # any other brain label (< 500) not listed above
CLOSING_MM = 6.0              # CSF inside the tissue's closing by this radius (sulci, cisterns) stays brain


@dataclass
class SynthConfig:
    """Ranges of the random draws (each volume draws uniformly inside them)."""
    rotation_deg: float = 8.0               # max rotation about each axis
    scale: float = 0.08                     # isotropic scale in [1 - scale, 1 + scale]
    elastic_mm: float = 3.0                 # max displacement of the elastic field's control points
    elastic_spacing_mm: float = 32.0        # control-point spacing of the elastic field
    csf_shell_mm: tuple[float, float] = (0.5, 4.0)    # extra-cerebral CSF kept within this distance of tissue
    wm: tuple[float, float] = (0.25, 0.45)            # white-matter mean (CSF ~ 1 after normalisation)
    gm_above_wm: tuple[float, float] = (0.08, 0.28)   # grey - white
    csf_above_gm: tuple[float, float] = (0.2, 0.5)    # csf - grey
    texture: tuple[float, float] = (0.02, 0.08)       # within-structure multiplicative texture (sd)
    blur_mm: tuple[float, float] = (0.3, 1.1)         # partial-volume blur (Gaussian sigma)
    thick_slice_p: float = 0.5                        # share of volumes with thick axial slices
    thick_mm: tuple[float, float] = (2.0, 6.0)
    bias: float = 0.3                                 # bias field: exp(N(0, bias)) at the coarse grid
    noise: tuple[float, float] = (0.0, 0.03)          # Rician noise sd, relative to the CSF mean
    gamma: tuple[float, float] = (0.8, 1.25)


def _lookup_table(labels: np.ndarray, rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, dict]:
    """Label value -> mean intensity (float32 table over 0..max label) and the drawn means per tissue."""
    wm = rng.uniform(*cfg.wm)
    gm = wm + rng.uniform(*cfg.gm_above_wm)
    csf = gm + rng.uniform(*cfg.csf_above_gm)

    def level(kind: str, f_range: tuple[float, float]) -> float:
        f = rng.uniform(*f_range) if f_range[0] != f_range[1] else f_range[0]
        if kind == "wm":
            return wm * f
        if kind == "mix":
            return wm + f * (gm - wm)
        if kind == "gm":
            return gm + f * (csf - gm)
        return csf * f

    top = int(labels.max())
    table = np.zeros(max(top, EXTRA_CEREBRAL) + 1, np.float32)
    means = {"wm": wm, "gm": gm, "csf": csf}
    for value in np.unique(labels).astype(int):
        if 0 < value < EXTRA_CEREBRAL:
            table[value] = level(*OTHER)
    for name, (values, (kind, f_range)) in TISSUES.items():
        m = level(kind, f_range)
        means[name] = m
        for v in values:
            if v < len(table):
                table[v] = m
    return table, means


LEFT, RIGHT = (2, 3), (41, 42)                 # cerebral white matter + cortex of each hemisphere
THALAMUS, CEREBELLUM = (10, 49), (7, 8, 46, 47)
PITCH_DEG = 40.0   # canonical thalamus -> cerebellum direction: this far below the horizontal (AC-PC-aligned
                   # brains, e.g. MNI152 / SRI24 as BraTS uses; the 20 SynthSeg maps are native-space: 13-75 deg)


def canonical_rotation(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World rotation [3, 3] that brings a native-space label map into the canonical head pose: the left -> right
    hemisphere centroids along +x, and the thalamus -> cerebellum direction PITCH_DEG below the horizontal in
    the y-z plane. Identity when the map lacks these labels (then its pose is taken as it is)."""
    A = np.asarray(affine, dtype=np.float64)

    def centroid(values):
        idx = np.argwhere(np.isin(labels, values))
        return None if len(idx) == 0 else A[:3, :3] @ idx.mean(axis=0) + A[:3, 3]

    pts = [centroid(v) for v in (LEFT, RIGHT, THALAMUS, CEREBELLUM)]
    if any(p is None for p in pts):
        return np.eye(3)
    left, right, thalamus, cerebellum = pts

    def frame(x_dir, down_dir):             # orthonormal frame: x, then the down direction made orthogonal to x
        x = x_dir / np.linalg.norm(x_dir)
        d = down_dir - x * (x @ down_dir)
        d /= np.linalg.norm(d)
        return np.stack([x, d, np.cross(x, d)], axis=1)                    # columns

    a = np.deg2rad(PITCH_DEG)
    target = frame(np.array([1.0, 0, 0]), np.array([0.0, -np.cos(a), -np.sin(a)]))
    return target @ frame(right - left, cerebellum - thalamus).T


def _warp_labels(labels: np.ndarray, affine: np.ndarray, rotation: np.ndarray, rng: np.random.Generator,
                 cfg: SynthConfig) -> np.ndarray:
    """Resample the label map (nearest neighbour) after the world `rotation` times a random small rotation and
    scale and a smooth elastic displacement, all about the grid's centre."""
    shape = np.array(labels.shape)
    a = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a[0]), -np.sin(a[0])], [0, np.sin(a[0]), np.cos(a[0])]])
    ry = np.array([[np.cos(a[1]), 0, np.sin(a[1])], [0, 1, 0], [-np.sin(a[1]), 0, np.cos(a[1])]])
    rz = np.array([[np.cos(a[2]), -np.sin(a[2]), 0], [np.sin(a[2]), np.cos(a[2]), 0], [0, 0, 1]])
    world = (rx @ ry @ rz @ rotation) * rng.uniform(1 - cfg.scale, 1 + cfg.scale)   # input world -> output world
    A3 = np.asarray(affine, dtype=np.float64)[:3, :3]
    matrix = np.linalg.inv(A3) @ np.linalg.inv(world) @ A3                 # output voxel -> input voxel
    centre = (shape - 1) / 2
    grid = np.indices(labels.shape, dtype=np.float32).reshape(3, -1) - centre[:, None].astype(np.float32)
    coords = (matrix.astype(np.float32) @ grid) + centre[:, None].astype(np.float32)     # [3, X*Y*Z]
    del grid
    n_ctrl = np.maximum(2, np.round(shape / cfg.elastic_spacing_mm).astype(int) + 1)
    for axis in range(3):
        ctrl = rng.uniform(-cfg.elastic_mm, cfg.elastic_mm, n_ctrl).astype(np.float32)
        coords[axis] += _upsample(ctrl, shape).reshape(-1)
    out = ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    return out.reshape(labels.shape)


def _upsample(coarse: np.ndarray, shape) -> np.ndarray:
    """A coarse control grid -> a smooth field of `shape`: cubic to a quarter of the size, then linear (the cubic
    zoom straight to full size cost 7 s of a 14 s volume)."""
    shape = np.asarray(shape)
    mid_shape = np.maximum(np.asarray(coarse.shape), np.ceil(shape / 4).astype(int))
    mid = ndimage.zoom(coarse, mid_shape / np.asarray(coarse.shape), order=3, mode="nearest", grid_mode=True)
    full = ndimage.zoom(mid, shape / np.asarray(mid.shape), order=1, mode="nearest", grid_mode=True)
    return full[:shape[0], :shape[1], :shape[2]]


def _smooth_field(rng: np.random.Generator, shape, sigma_vox: float) -> np.ndarray:
    """Zero-mean, unit-sd smooth Gaussian noise [shape] (low-pass filtered white noise)."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return n / (n.std() + 1e-8)


def _thick_slices(img: np.ndarray, axis: int, thickness: float, rng: np.random.Generator) -> np.ndarray:
    """Simulate thick slices along `axis`: slab-profile blur, sampling every `thickness` mm (random phase),
    linear re-interpolation back to the 1 mm grid."""
    img = ndimage.gaussian_filter1d(img, thickness / 2.355, axis=axis, mode="nearest")
    n = img.shape[axis]
    centres = np.arange(rng.uniform(0, thickness), n, thickness)
    if len(centres) < 2:
        return img
    sampled = ndimage.map_coordinates(
        img, _axis_coords(img.shape, axis, centres), order=1, mode="nearest")
    pos = np.interp(np.arange(n), centres, np.arange(len(centres)))       # 1 mm positions in sample units
    return ndimage.map_coordinates(sampled, _axis_coords(sampled.shape, axis, pos), order=1, mode="nearest")


def _axis_coords(shape, axis: int, positions: np.ndarray) -> np.ndarray:
    """Coordinates for map_coordinates that resample `axis` at `positions` and keep the other axes."""
    out_shape = list(shape)
    out_shape[axis] = len(positions)
    grids = [np.arange(s, dtype=np.float32) for s in out_shape]
    grids[axis] = positions.astype(np.float32)
    return np.stack(np.meshgrid(*grids, indexing="ij"))


def _brain_box(labels: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of brain labels (1..499) plus `margin` voxels, clipped to the grid."""
    brain = (labels > 0) & (labels < EXTRA_CEREBRAL)
    if not brain.any():
        raise ValueError("label map has no brain label (values 1-499)")
    box = []
    for axis in range(3):
        hit = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(0, hit[0] - margin), min(labels.shape[axis], hit[-1] + margin + 1)))
    return tuple(box)


def synthesize(labels: np.ndarray, affine: np.ndarray, rng: np.random.Generator, cfg: SynthConfig | None = None
               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """One healthy T2-like volume from a label map [X, Y, Z] (integer labels, FreeSurfer values) on a grid with
    `affine`. Returns (image [X, Y, Z] float32 >= 0, exactly 0 outside the brain; the warped label map with
    extra-cerebral labels and far CSF set to 0 [X, Y, Z] int32; the drawn parameters)."""
    cfg = cfg or SynthConfig()
    labels = np.rint(np.asarray(labels)).astype(np.int32)
    if labels.ndim != 3:
        raise ValueError(f"label map must be 3-D, got shape {labels.shape}")
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    rotation = canonical_rotation(labels, affine)
    box = _brain_box(labels, margin=int(np.ceil(cfg.elastic_mm + 24)))   # work on the brain only: 2x fewer voxels
    lab = _warp_labels(labels[box], affine, rotation, rng, cfg)
    outside = lab >= EXTRA_CEREBRAL                 # skull, scalp...: dark, for the partial volume at the edge
    lab[outside] = 0
    tissue = (lab > 0) & (lab != CSF_LABEL)
    if not tissue.any():
        raise ValueError("no brain tissue left after deformation")
    # brain mask as a skull stripper draws it: the tissue's envelope (closing by CLOSING_MM fills sulci and
    # cisterns) plus a thin random shell of the CSF around it
    shell = rng.uniform(*cfg.csf_shell_mm)
    dist_out = ndimage.distance_transform_edt(~tissue, sampling=zooms)
    closed = ndimage.distance_transform_edt(dist_out <= CLOSING_MM, sampling=zooms) > CLOSING_MM
    far_csf = (lab == CSF_LABEL) & ~(closed | (dist_out <= shell))
    brain = (lab > 0) & ~far_csf

    table, means = _lookup_table(lab, rng, cfg)
    img = table[lab]                                # [x, y, z] structure means; far CSF stays CSF until the mask
    img[outside] = means["wm"] * rng.uniform(0.1, 0.5)
    lab[far_csf] = 0
    texture = rng.uniform(*cfg.texture)
    img = img * (1 + texture * _smooth_field(rng, img.shape, rng.uniform(0.5, 1.5)))
    blur = rng.uniform(*cfg.blur_mm)
    img = ndimage.gaussian_filter(img, blur / zooms)
    axial = int(np.argmax(np.abs(np.asarray(affine)[2, :3])))             # the array axis closest to S-I
    thick = None
    if rng.uniform() < cfg.thick_slice_p:
        thick = rng.uniform(*cfg.thick_mm)
        img = _thick_slices(img, axial, thick / zooms[axial], rng)
    coarse = rng.normal(0, cfg.bias, (4, 4, 4)).astype(np.float32)
    bias = np.exp(_upsample(coarse, img.shape))
    img = img * bias
    sd = rng.uniform(*cfg.noise) * means["csf"]
    if sd > 0:
        img = np.sqrt((img + sd * rng.standard_normal(img.shape)) ** 2 + (sd * rng.standard_normal(img.shape)) ** 2)
    gamma = rng.uniform(*cfg.gamma)
    scale = float(np.percentile(img[brain], 99.5))
    img = (np.clip(img / scale, 0, None) ** gamma) * scale
    img = np.where(brain, np.maximum(img, 1e-3 * scale), 0.0).astype(np.float32)

    out_img = np.zeros(labels.shape, np.float32)
    out_lab = np.zeros(labels.shape, np.int32)
    out_img[box], out_lab[box] = img, lab
    params = {"means": {k: round(float(v), 4) for k, v in means.items()}, "texture": round(texture, 4),
              "blur_mm": round(blur, 3), "thick_mm": None if thick is None else round(thick, 2),
              "csf_shell_mm": round(shell, 2), "noise_sd": round(float(sd), 4), "gamma": round(gamma, 3),
              "bias_sd": cfg.bias}
    return out_img, out_lab, params


def label_maps(folder: str | Path) -> list[Path]:
    """The .nii/.nii.gz label maps in `folder` (sorted; hidden files ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "label-map folder not found")
    maps = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()
                  and (p.name.endswith(".nii.gz") or p.name.endswith(".nii")))
    if not maps:
        raise InputError(folder, "no .nii or .nii.gz label maps found")
    return maps


def make_synth(labelmaps: str | Path, out: str | Path, n: int, seed: int = 0, cfg: SynthConfig | None = None,
               select: slice = slice(None), progress: bool = True) -> dict:
    """Write `n` healthy volumes `out/synth_<map>_<k>.nii.gz` (label map i % L of the sorted maps, volume k of it)
    and `out/synth.json` (generator version, seed, source map and drawn parameters of each volume). `select` takes
    a part of the sorted maps (e.g. slice(0, 18) for training and slice(18, 20) for held-out subjects). Volume i
    is drawn from numpy's generator seeded by (seed, i, map name): the same seed gives the same files, a larger n
    adds volumes without changing the first ones, and existing volumes of the same generator, seed and map are
    kept (an interrupted run resumes)."""
    from tqdm import tqdm

    cfg = cfg or SynthConfig()
    maps = label_maps(labelmaps)[select]
    if not maps:
        raise InputError(labelmaps, f"the selection {select.start}:{select.stop} leaves no label map")
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "synth.json"
    old = {}
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except ValueError:
            old = {}
    same = old.get("version") == GENERATOR_VERSION and old.get("seed") == seed and old.get("config") == _cfg_json(cfg)
    done = {v["file"]: v for v in old.get("volumes", [])} if same else {}
    volumes = []
    for i in tqdm(range(n), desc="synthesise", unit="volume", disable=not progress):
        src = maps[i % len(maps)]
        name = f"synth_{_stem(src)}_{i // len(maps):02d}.nii.gz"
        if name in done and done[name]["source"] == src.name and (out / name).is_file():
            volumes.append(done[name])
            continue
        img = load_volume(src, allow_zero=True)
        labels = np.asarray(img.dataobj)
        key = [seed, i // len(maps), *src.name.encode()]          # the map's name, not its position, seeds it
        image, _, params = synthesize(labels, img.affine, np.random.default_rng(key), cfg)
        gain = 1000.0 / max(float(image.max()), 1e-6)                     # int16 like scanner data
        save_nifti(np.rint(image * gain).astype(np.int16), img.affine, img, out / name, dtype=np.int16)
        volumes.append({"file": name, "source": src.name, "index": i, **params})
        _write_meta(meta_path, seed, cfg, volumes)
    _write_meta(meta_path, seed, cfg, volumes)
    notice = Path(labelmaps) / "LICENSE-SynthSeg.txt"
    for candidate in (notice, Path(labelmaps).parent / "LICENSE-SynthSeg.txt"):
        if candidate.is_file():
            (out / "LICENSE-SynthSeg.txt").write_text(candidate.read_text())
            break
    (out / "NOTICE.txt").write_text(
        "Volumes generated by mimood.data.synth from label maps of SynthSeg (Billot et al., Medical Image "
        "Analysis 2023; github.com/BBillot/SynthSeg), Apache License 2.0.\nThe label maps were deformed, "
        "given random T2-like intensities and skull-stripped; see synth.json.\n")
    return {"version": GENERATOR_VERSION, "seed": seed, "volumes": volumes}


def _cfg_json(cfg: SynthConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


def _write_meta(path: Path, seed: int, cfg: SynthConfig, volumes: list[dict]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps({"version": GENERATOR_VERSION, "seed": seed, "config": _cfg_json(cfg),
                                   "volumes": volumes}, indent=1) + "\n")


def _stem(p: Path) -> str:
    name = p.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


