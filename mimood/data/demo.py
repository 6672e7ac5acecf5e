"""Built-in demo data, no download: synthetic "subjects" made from the shipped MNI152 T2 brain template.

Each volume is the template (a population average of healthy adults, skull-stripped) pushed through
MONAI random transforms so that no two subjects are alike:
- anatomy: a random smooth elastic deformation plus a small affine (rotation, shrink to native brain
  size, shift), computed on a coarse control grid (MONAI RandDeformGrid + RandAffineGrid, upsampled
  like MONAI's Rand2DElastic does in 2-D) and applied once at full resolution (MONAI Resample);
- acquisition: bias field (RandBiasField), gamma (RandAdjustContrast), Gaussian blur (scipy),
  Rician noise (RandRicianNoise) and a random global intensity scale, stored as int16 like scanner data.
Test volumes carry synthetic lesions (see `_add_lesion`) with a label volume (1 = lesion core, 2 =
oedema-like rim, so label > 0 is the whole lesion), in the `images/` + `labels/` layout. Every random
number comes from numpy RandomStates seeded per volume from `seed`: the same seed gives bit-identical files.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    CenterSpatialCrop,
    RandAdjustContrast,
    RandAffineGrid,
    RandBiasField,
    RandDeformGrid,
    RandRicianNoise,
    Resample,
)
from scipy import ndimage
from tqdm import tqdm

from mimood.data.io import atomic_write, load_volume, save_nifti
from mimood.errors import InputError

TEMPLATE = "mni152_t2_1mm_brain_template.nii.gz"
CONTROL_SPACING = 24          # voxels between elastic control points (the deformation is smooth at this scale)
KINDS = [(contrast, rim, size) for contrast in ("hyper", "hypo") for rim in (False, True)
         for size in ("small", "large")]


def load_template() -> nib.Nifti1Image:
    """The shipped MNI152 T2 1 mm brain template (182 x 218 x 182, LAS, background 0)."""
    with resources.as_file(resources.files("mimood.data") / "assets" / TEMPLATE) as path:
        return load_volume(path)


def make_demo(out: str | Path, n_train: int = 16, n_test_lesion: int = 6, n_test_healthy: int = 2, seed: int = 0,
              progress: bool = True) -> dict:
    """Write the demo data set under `out` and return its description (also written to out/demo.json).

    out/train/healthy_XXX.nii.gz: healthy training volumes;
    out/test/images/{lesion_XXX, healthy_test_XXX}.nii.gz with out/test/labels/<same name>.nii.gz.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if min(n_train, n_test_lesion, n_test_healthy) < 0:
        raise ValueError("volume counts must be >= 0")
    template, brain, affine = _template()
    ref = _reference_header(affine)
    perm = np.random.RandomState(_seed(seed, 0, 0)).permutation(len(KINDS))
    jobs = ([("train", i) for i in range(n_train)] + [("lesion", i) for i in range(n_test_lesion)]
            + [("healthy_test", i) for i in range(n_test_healthy)])
    info = {"seed": seed, "n_train": n_train, "n_test_lesion": n_test_lesion, "n_test_healthy": n_test_healthy,
            "template": TEMPLATE, "shape": list(template.shape), "voxel_mm": 1.0,
            "train": [], "test": []}
    n_lesions = 0
    for role, i in tqdm(jobs, desc="demo volumes", unit="volume", disable=not progress):
        rs = np.random.RandomState(_seed(seed, {"train": 1, "lesion": 2, "healthy_test": 3}[role], i))
        vol, mask = _subject(template, brain, rs)
        label = np.zeros(vol.shape, dtype=np.uint8)
        lesions = []
        if role == "lesion":
            dist = _inner_distance(mask)
            for _ in range(rs.randint(2, 4)):
                kind = KINDS[perm[n_lesions % len(KINDS)]]
                n_lesions += 1
                lesion = _add_lesion(vol, mask, label, dist, lesions, rs, *kind)
                if lesion is not None:
                    lesion["centre_mm"] = [round(float(v), 1) for v in nib.affines.apply_affine(
                        affine, lesion["centre_voxel"])]
                    lesions.append(lesion)
        scan = _acquire(vol, mask, rs)
        if role == "train":
            name = f"healthy_{i:03d}"
            save_nifti(scan, affine, ref, out / "train" / f"{name}.nii.gz", dtype=np.int16)
            info["train"].append(f"train/{name}.nii.gz")
        else:
            name = f"{role}_{i:03d}"
            save_nifti(scan, affine, ref, out / "test" / "images" / f"{name}.nii.gz", dtype=np.int16)
            save_nifti(label, affine, ref, out / "test" / "labels" / f"{name}.nii.gz", dtype=np.uint8)
            info["test"].append({"name": name, "image": f"test/images/{name}.nii.gz",
                                 "label": f"test/labels/{name}.nii.gz", "lesions": lesions})
    with atomic_write(out / "demo.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    with atomic_write(out / "README.txt") as tmp:
        tmp.write_text(_readme(info))
    return info


def _seed(seed: int, role: int, i: int) -> int:
    """An independent 32-bit seed per (seed, role, volume) (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, role, i]).generate_state(1)[0])


def _template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template data and brain mask cropped to the brain plus an 8-voxel margin, with the crop's affine."""
    img = load_template()
    data = img.get_fdata(dtype=np.float32)
    brain = data > 0
    # The template's mask has one ~400-voxel hole by the midbrain; fill it with the surrounding tissue
    # (normalised Gaussian smoothing) so that no demo subject has a black spot inside the brain.
    hole = ndimage.binary_fill_holes(brain) & ~brain
    local = ndimage.gaussian_filter(data, 2.0) / np.maximum(ndimage.gaussian_filter(brain.astype(np.float32), 2.0),
                                                             1e-3)
    data[hole], brain = local[hole], brain | hole
    box = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    lo = [max(int(b[0]) - 8, 0) for b in box]
    hi = [min(int(b[-1]) + 9, n) for b, n in zip(box, data.shape)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    affine = img.affine.copy()
    affine[:3, 3] = nib.affines.apply_affine(img.affine, lo)
    return data[crop].copy(), brain[crop].copy(), affine


def _reference_header(affine: np.ndarray) -> nib.Nifti1Image:
    """A header in scanner space (qform = sform, code 1) with mm units, like a converted scan."""
    ref = nib.Nifti1Image(np.zeros((1, 1, 1), np.int16), affine)
    ref.set_qform(affine, code=1)
    ref.set_sform(affine, code=1)
    ref.header.set_xyzt_units("mm", "sec")
    ref.header["descrip"] = b"mimood synthetic demo (from MNI152 T2 template)"
    return ref


def _subject(template: np.ndarray, brain: np.ndarray, rs: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """A new anatomy: template and mask warped by one random elastic + affine deformation."""
    shape = template.shape
    deform = RandDeformGrid(spacing=(CONTROL_SPACING,) * 3, magnitude_range=(1.0, 3.0))
    affine = RandAffineGrid(rotate_range=(0.12, 0.08, 0.08), scale_range=((0.02, 0.12),) * 3,
                            translate_range=(3, 3, 3))
    deform.set_random_state(state=rs)
    affine.set_random_state(state=rs)
    grid = affine(grid=deform(spatial_size=shape))                  # [4, cx, cy, cz] control points (voxels)
    grid = F.interpolate(grid[None], scale_factor=(CONTROL_SPACING,) * 3, mode="trilinear",
                         align_corners=False, recompute_scale_factor=True)[0]
    grid = CenterSpatialCrop(roi_size=shape)(grid)                  # [4, X, Y, Z] dense sampling grid
    img = torch.from_numpy(np.stack([template, brain.astype(np.float32)]))
    warped = Resample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(img, grid)
    warped = np.asarray(warped, dtype=np.float32)
    mask = warped[1] >= 0.5
    return np.where(mask, warped[0], 0).astype(np.float32), mask


def _acquire(vol: np.ndarray, mask: np.ndarray, rs: np.random.RandomState) -> np.ndarray:
    """Scanner-like appearance: bias field, gamma, blur, Rician noise, intensity scale -> int16, background 0."""
    x = torch.from_numpy(vol[None])
    for t in (RandBiasField(degree=3, coeff_range=(-0.12, 0.12), prob=1.0),
              RandAdjustContrast(prob=1.0, gamma=(0.8, 1.25))):
        t.set_random_state(state=rs)
        x = t(x)
    # Blur with scipy rather than MONAI RandGaussianSmooth: its 3-D torch convolutions take ~1 s a volume
    # here, scipy's separable filter a fifth of that, for the same Gaussian.
    x = torch.from_numpy(ndimage.gaussian_filter(np.asarray(x), [0] + list(rs.uniform(0.2, 0.7, 3))))
    noise = RandRicianNoise(prob=1.0, std=0.03, relative=True, sample_std=True)
    noise.set_random_state(state=rs)
    x = noise(x)
    scale = rs.uniform(2.0, 4.0)
    x = np.asarray(x[0], dtype=np.float32) * scale
    return np.where(mask, np.clip(np.rint(x), 1, 32767), 0).astype(np.int16)


def _inner_distance(mask: np.ndarray) -> np.ndarray:
    """Distance (mm) of each voxel to the brain's outside, computed at 2 mm (plenty for placing lesions)."""
    return ndimage.distance_transform_edt(mask[::2, ::2, ::2]) * 2.0


def _add_lesion(vol: np.ndarray, mask: np.ndarray, label: np.ndarray, dist: np.ndarray, others: list[dict],
                rs: np.random.RandomState, contrast: str, rim: bool, size: str) -> dict | None:
    """Blend one synthetic lesion into `vol` (in place) and mark it in `label`; its description, or None.

    Shape: a randomly rotated ellipsoid whose surface is perturbed by smooth noise, with soft (sigmoid)
    edges. Intensity is relative to the tissue it replaces: hyper-intense cores (x1.6-2.2, tumour or
    oedema on T2, capped below CSF brightness) or hypo-intense cores (x0.4-0.7, necrosis or cavity),
    with a light texture; an optional oedema-like rim is moderately hyper-intense (x1.25-1.5).
    """
    r_core = rs.uniform(3.0, 6.0) if size == "small" else rs.uniform(10.0, 18.0)
    r_rim = (rs.uniform(2.0, 4.0) if size == "small" else rs.uniform(5.0, 10.0)) if rim else 0.0
    factor = rs.uniform(1.6, 2.2) if contrast == "hyper" else rs.uniform(0.4, 0.7)
    rim_factor = rs.uniform(1.25, 1.5)
    centre = None
    for shrink in (1.0, 0.8, 0.6):                                   # smaller if the brain has no room
        need = shrink * (r_core + 0.5 * r_rim) + 3.0
        ok = dist >= need
        for o in others:                                             # keep clear of earlier lesions
            c = np.asarray(o["centre_voxel"]) / 2.0
            zz = np.ogrid[tuple(slice(0, n) for n in dist.shape)]
            far = sum((z - ci) ** 2 for z, ci in zip(zz, c)) * 4.0 >= (need + o["radius_mm"] + o["rim_mm"]) ** 2
            ok &= far
        candidates = np.argwhere(ok)
        if len(candidates):
            r_core, r_rim = r_core * shrink, r_rim * shrink
            centre = np.minimum(candidates[rs.randint(len(candidates))] * 2 + rs.randint(0, 2, 3),
                                np.array(vol.shape) - 1)
            break
    if centre is None:
        return None

    reach = int(np.ceil((r_core + r_rim) * 1.5)) + 4
    box = tuple(slice(max(c - reach, 0), min(c + reach + 1, n)) for c, n in zip(centre, vol.shape))
    offsets = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) - c for s, c in zip(box, centre)],
                                   indexing="ij"), axis=-1).astype(np.float32)          # [x, y, z, 3] mm
    rotation, _ = np.linalg.qr(rs.normal(size=(3, 3)))
    radii = r_core * rs.uniform(0.7, 1.3, 3)
    d = np.linalg.norm(offsets @ rotation / radii, axis=-1) * r_core                    # ~mm from the centre
    sub_shape = d.shape

    def smooth_noise(sigma: float) -> np.ndarray:
        n = ndimage.gaussian_filter(rs.normal(size=sub_shape), sigma)
        return (n / (n.std() + 1e-8)).astype(np.float32)

    brain = mask[box]
    w_core = _sigmoid((r_core - (d + 0.25 * r_core * smooth_noise(max(1.5, r_core / 2)))) / 0.8) * brain
    w_rim = w_core
    if rim:
        outer = r_core + r_rim
        w_rim = np.maximum(w_core, _sigmoid((outer - (d + 0.3 * outer * smooth_noise(max(2.0, outer / 2)))) / 1.5)
                           * brain)
    region = (w_rim >= 0.5) & brain
    if not region.any():
        return None
    patch = vol[box]
    base = float(patch[region].mean())                               # the tissue the lesion replaces
    ceiling = float(np.percentile(vol[mask], 99.5)) * 0.95           # stay below CSF brightness
    core_value = np.minimum(base * factor, ceiling) * (1.0 + 0.08 * smooth_noise(1.5))
    rim_value = min(base * rim_factor, ceiling)
    vol[box] = patch * (1 - w_rim) + rim_value * (w_rim - w_core) + core_value * w_core

    sub = label[box]
    core = (w_core >= 0.5) & brain
    sub[region & (sub == 0)] = 2 if rim else 1
    sub[core] = 1
    return {"kind": contrast, "rim": rim, "size": size, "radius_mm": round(float(r_core), 1),
            "rim_mm": round(float(r_rim), 1), "contrast": round(float(factor), 2),
            "centre_voxel": [int(c) for c in centre], "volume_ml": round(float(region.sum()) / 1000.0, 2)}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))).astype(np.float32)


def _readme(info: dict) -> str:
    n_lesions = sum(len(t["lesions"]) for t in info["test"])
    return f"""mimood demo data (synthetic, seed {info['seed']})
==========================================

Made by `mimood-data demo` from the MNI152 T2 1 mm brain template shipped with mimood (HCP Pipelines,
BSD-style licence; see mimood/data/assets/NOTICE-MNI152.md). No real person's scan is included.

train/healthy_XXX.nii.gz       {info['n_train']} healthy volumes for training
test/images/lesion_XXX.nii.gz  {info['n_test_lesion']} volumes with {n_lesions} synthetic lesions in all
test/images/healthy_test_XXX   {info['n_test_healthy']} healthy volumes (all-zero labels) for scan-level scores
test/labels/<name>.nii.gz      label volumes: 1 = lesion core, 2 = oedema-like rim, 0 = none
demo.json                      the seed, the counts and every lesion's kind, size, centre and volume

Every volume is a new "subject": the template warped by a random smooth elastic and affine deformation,
then given a random bias field, gamma, blur, Rician noise and intensity scale (MONAI random transforms),
skull-stripped (background exactly 0), int16, {' x '.join(map(str, info['shape']))} voxels of 1 mm.
Lesions are irregular, smooth-edged blobs inside the brain whose intensity is relative to the tissue they
replace: hyper-intense (like tumour or oedema on T2) or hypo-intense (like necrosis or a cavity), small
(3-6 mm radius) or large (10-18 mm), with or without an oedema-like rim, two or three per scan.

Use train/ as the training data and test/ (images/ + labels/) for evaluation.
"""
