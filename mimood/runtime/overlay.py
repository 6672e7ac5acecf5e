"""The PNG overlay of a scan: which axial slices to show, and how to draw them so that they read right.

    pick = pick_panels(slices, maps, threshold)                 # Panels: slice positions and why
    write_overlay("out/case.png", "case", slices, maps, threshold, score=0.97, score_name="ood.mirror")

Drawing (matplotlib, imported only here and only when a PNG is written; without it `write_overlay` writes nothing
and returns a one-line note, so a runtime-only install without matplotlib still makes maps and reports):
- radiological convention by default: the patient's right on the image's left, as a radiologist reads an axial
  slice (mimood.data.preprocess lays slices out the other way, neurological: row 0 anterior, column 0 the
  patient's left); R and L on every panel, the convention written under the title; `radiological=False` for the
  neurological view;
- the scan in grey, the anomaly map in a heat colour map over a fixed window [0, 2 x threshold] (the same for every
  scan of a model, so colours compare across scans; [0, the map's 99.9th percentile] without a threshold), a colour
  bar with the threshold marked, and the outline of the flagged components that pass the size filter;
- the title: the scan's name, its score and the score's name; each panel: the slice number in the INPUT's own
  voxel grid, along the input axis closest to superior-inferior (`input_slice`), and the flagged volume there.

Panel choice (`pick_panels`): the flagged voxels (map > threshold inside the brain) are split into 3-D connected
components and the size filter of mimood.runtime.components drops specks. Components are ranked by volume; those
lying mostly on edge slices (less than EDGE_AREA_SHARE of the largest slice's brain area: the first and last
slices of the brain, where partial volume makes the map noisy) come only when the others have no slice left to
show. Panels go round-robin over the ranked components, each time the slice where that component is largest
among its main slices (at least MAIN_SHARE of its largest cross-section: a speck touching it does not count), core
slices first, at least PANEL_GAP_MM from every other panel and spread over the component's extent (its slice
range / (its share of the panels + 1)) from its own: one component fills all panels across its extent, and a
second one is never pushed out of the picture by the first. Panels left over (nothing flagged, no threshold, a
small component) show the slices with the most in-brain map mass, core slices first.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from mimood.data.io import atomic_write
from mimood.data.preprocess import Geometry, Slices
from mimood.runtime.components import CONNECTIVITY, MIN_COMPONENT_ML, label_components, voxel_ml
from mimood.runtime.reference import format_score

PANELS = 4                 # slices shown
EDGE_AREA_SHARE = 0.25     # slices with less brain than this share of the largest slice are edge slices
PANEL_GAP_MM = 4.0         # panels of one component lie at least this far apart
MAIN_SHARE = 0.25          # a component is shown on slices where it has at least this share of its largest area
NO_MATPLOTLIB = "matplotlib is not installed: no PNG overlays written (pip install matplotlib)"


@dataclass
class Panels:
    rows: np.ndarray           # [n] positions in the slice stack (Slices.images[rows]), inferior to superior
    slices: list[int]          # [n] the same slices in the input's voxel grid (input_slice)
    axis: int                  # the input voxel axis the slice numbers count along (0, 1, 2)
    component: list[int]       # [n] the component (1 = largest) each panel was chosen for, 0 = none
    component_ml: list[float]  # [C] volume of each kept component, on the 1 mm slice grid, largest first
    labels: np.ndarray         # [S, H, W] int32 kept components (1 = largest), 0 elsewhere
    removed: int               # components dropped by the size filter

    @property
    def components(self) -> int:
        return len(self.component_ml)


def input_slice(geometry: Geometry, k: int) -> tuple[int, int]:
    """(input voxel axis closest to superior-inferior, the input slice on it nearest to grid slice k): kept slices
    are numbered along the RAS grid of preprocessing (`Slices.index`), which is the input reoriented (and resampled
    to 1 mm where its voxels differ); a user counts slices in the input file."""
    ornt = np.asarray(geometry.ornt)                                    # [3, 2]: (RAS axis, +-1) per input axis
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    cz = float(k)
    if geometry.resampled:                                             # grid voxel -> world -> canonical voxel
        world = np.asarray(geometry.grid_affine) @ np.array([0.0, 0.0, k, 1.0])
        cz = float((np.linalg.inv(np.asarray(geometry.canonical_affine)) @ world)[2])
    n = geometry.shape[axis]
    idx = int(round(cz)) if ornt[axis, 1] > 0 else int(round(n - 1 - cz))
    return axis, int(np.clip(idx, 0, n - 1))


def pick_panels(slices: Slices, maps: np.ndarray, threshold: float | None, n: int = PANELS,
                min_ml: float = MIN_COMPONENT_ML, connectivity: int = CONNECTIVITY) -> Panels:
    """The n slices to show (module docstring) for maps [S, H, W] of `slices`."""
    brain = slices.brain                                                  # [S, H, W]
    S = len(brain)
    index = np.asarray(slices.index)
    g = slices.geometry
    spacing = float(np.sqrt((np.asarray(g.grid_affine)[:3, 2] ** 2).sum()))   # mm between grid slices
    gap = max(1, int(np.ceil(PANEL_GAP_MM / spacing - 1e-9)))
    area = brain.sum(axis=(1, 2))                                         # [S]
    core = area >= EDGE_AREA_SHARE * max(int(area.max()), 1)              # [S]

    # components on the full grid stack, so that only neighbouring grid slices touch
    z0 = int(index.min())
    stack = np.zeros((int(index.max()) - z0 + 1,) + brain.shape[1:], bool)   # [Z, H, W]
    flagged = (maps > threshold) & brain if threshold is not None else np.zeros_like(brain)
    stack[index - z0] = flagged
    labels_z, sizes, removed, _ = label_components(stack, voxel_ml(np.asarray(g.grid_affine)), min_ml, connectivity)
    labels = labels_z[index - z0]                                         # [S, H, W]
    per_slice = np.stack([(labels == c + 1).sum(axis=(1, 2)) for c in range(len(sizes))]) if len(sizes) else \
        np.zeros((0, S), np.int64)                                        # [C, S] voxels of each component

    chosen: list[int] = []
    why: dict[int, int] = {}                                              # slice row -> component (1-based)
    if len(sizes):
        edge_share = 1 - (per_slice * core).sum(axis=1) / per_slice.sum(axis=1)     # [C] voxels on edge slices
        ranked = sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))
        main = per_slice >= np.maximum(1, MAIN_SHARE * per_slice.max(axis=1, keepdims=True))   # [C, S]
        own: dict[int, list[int]] = {c: [] for c in ranked}
        for group in ([c for c in ranked if edge_share[c] <= 0.5], [c for c in ranked if edge_share[c] > 0.5]):
            share = -(-n // max(len(group), 1))                           # panels per component, about
            spread = {c: max(gap, int(np.ptp(index[main[c]])) // (share + 1)) for c in group}
            added = True
            while added and len(chosen) < min(n, S):                       # round-robin over the group
                added = False
                for c in group:
                    if len(chosen) >= n:
                        break
                    s = _best_slice(per_slice[c], core, own[c], spread[c], index, chosen, gap)
                    if s is not None:
                        own[c].append(s)
                        chosen.append(s)
                        why[s] = c + 1
                        added = True
    if len(chosen) < min(n, S):                                           # fill: in-brain map mass, core first
        mass = np.where(brain, maps, 0).sum(axis=(1, 2))
        for s in np.lexsort((-mass, ~core)):
            if len(chosen) >= n:
                break
            if int(s) not in chosen and all(abs(int(index[s]) - int(index[t])) >= gap for t in chosen):
                chosen.append(int(s))
        for s in np.lexsort((-mass, ~core)):                             # too few slices for the gap
            if len(chosen) >= min(n, S):
                break
            if int(s) not in chosen:
                chosen.append(int(s))
    rows = np.array(sorted(chosen), dtype=int)
    axis = input_slice(g, int(index[0]))[0]
    ml = voxel_ml(np.asarray(g.grid_affine))
    return Panels(rows, [input_slice(g, int(index[r]))[1] for r in rows], axis, [why.get(int(r), 0) for r in rows],
                  [float(v * ml) for v in sizes], labels, removed)


def _best_slice(voxels: np.ndarray, core: np.ndarray, own: list[int], spread: int, index: np.ndarray,
                taken: list[int], gap: int) -> int | None:
    """The slice with most of a component's voxels [S] among its main slices (at least MAIN_SHARE of its largest
    cross-section, so not a speck that touches it), core slices first, at least `spread` grid slices from the
    component's own panels and `gap` from every other panel; None when there is none left."""
    main = voxels >= max(1.0, MAIN_SHARE * float(voxels.max()))
    for s in np.lexsort((-voxels, ~core)):
        if not main[s]:
            continue
        z = int(index[s])
        if all(abs(z - int(index[t])) >= spread for t in own) and all(abs(z - int(index[t])) >= gap for t in taken):
            return int(s)
    return None


def overlay_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_overlay(path: str | Path, name: str, slices: Slices, maps: np.ndarray, threshold: float | None,
                  score: float | None = None, score_name: str = "", radiological: bool = True, n: int = PANELS,
                  min_ml: float = MIN_COMPONENT_ML, calibrated: bool = True) -> str:
    """Write the overlay PNG (module docstring) atomically; '' when written, else the one-line reason
    (NO_MATPLOTLIB). calibrated=False: `score` is a raw score (no healthy reference), and the title says so."""
    if not overlay_available():
        return NO_MATPLOTLIB
    with missing_glyphs_quiet():
        fig = overlay_figure(name, slices, maps, threshold, score, score_name, radiological, n, min_ml, calibrated)
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    return ""


@contextmanager
def missing_glyphs_quiet() -> Iterator[None]:
    """Inside, matplotlib draws characters its font lacks (a CJK scan name) as boxes without its warning per
    glyph, which would be a stray line on the screen of a folder run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from", category=UserWarning)
        yield


def display_window(maps: np.ndarray, brain: np.ndarray, threshold: float | None) -> float:
    """The colour map's upper end: 2 x threshold, else the in-brain 99.9th percentile (at least 1e-6)."""
    if threshold is not None and threshold > 0:
        return 2.0 * float(threshold)
    values = maps[brain]
    return max(float(np.percentile(values, 99.9)) if values.size else 0.0, 1e-6)


def overlay_figure(name: str, slices: Slices, maps: np.ndarray, threshold: float | None, score: float | None = None,
                   score_name: str = "", radiological: bool = True, n: int = PANELS,
                   min_ml: float = MIN_COMPONENT_ML, calibrated: bool = True):
    """The matplotlib Figure of `write_overlay` (a bare Figure: no pyplot state, no window, nothing to close)."""
    import matplotlib
    from matplotlib.figure import Figure
    import matplotlib.patheffects as pe

    panels = pick_panels(slices, maps, threshold, n, min_ml)
    vmax = display_window(maps, slices.brain, threshold)
    cmap = matplotlib.colormaps["inferno"]
    k = len(panels.rows)
    fig = Figure(figsize=(2.6 * k + 1.1, 3.6))
    grid = fig.add_gridspec(1, k + 1, width_ratios=[1] * k + [0.07], left=0.01, right=0.93, top=0.80,
                            bottom=0.03, wspace=0.04)
    flip = (lambda a: a[:, ::-1]) if radiological else (lambda a: a)      # display: column 0 = patient's left
    left, right = ("R", "L") if radiological else ("L", "R")
    outline = [pe.withStroke(linewidth=2.5, foreground="black")]
    axis_name = "ijk"[panels.axis]
    for j, r in enumerate(panels.rows):
        ax = fig.add_subplot(grid[0, j])
        m = flip(maps[r])
        ax.imshow(flip(slices.images[r]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.imshow(m, cmap=cmap, vmin=0, vmax=vmax, alpha=0.8 * np.clip(m / vmax, 0, 1), interpolation="nearest")
        kept = flip(panels.labels[r] > 0)
        if kept.any():
            ax.contour(kept, levels=[0.5], colors="cyan", linewidths=0.9)
        for x, text, ha in ((0.02, left, "left"), (0.98, right, "right")):
            ax.text(x, 0.5, text, transform=ax.transAxes, ha=ha, va="center", color="white", fontsize=12,
                    fontweight="bold", path_effects=outline)
        c = panels.component[j]
        what = f": component {c}, {panels.component_ml[c - 1]:.1f} ml" if c else ""
        ax.set_title(f"slice {axis_name} = {panels.slices[j]}{what}", fontsize=8.5)
        ax.set_xticks([])
        ax.set_yticks([])

    cax = fig.add_subplot(grid[0, k])
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, vmax), cmap), cax=cax)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("anomaly map", fontsize=8)
    if threshold is not None:
        cax.axhline(threshold, color="cyan", linewidth=2.5)
        bar.set_ticks([0, threshold, vmax], labels=["0", f"{threshold:.3g}\nthreshold", f"{vmax:.3g}"])

    if score is None:
        score_text = "no scan score"
    elif calibrated:
        score_text = f"scan score {format_score(score)}" + (f" ({score_name})" if score_name else "")
    else:
        score_text = f"raw {score_name or 'scan'} score {score:.4g} (no healthy reference: not in [0, 1])"
    fig.suptitle(f"{name}: {score_text}", fontsize=10, y=0.985)
    view = ("radiological view: patient's right on image left" if radiological
            else "neurological view: patient's left on image left")
    if threshold is None:
        found = "no calibrated threshold: no mask"
    else:
        found = (f"{panels.components} component(s) >= {min_ml:g} ml outlined"
                 + (f", {panels.removed} smaller dropped" if panels.removed else ""))
    fig.text(0.5, 0.895, f"{view}; slices in the input's voxel grid (axis {axis_name}); {found}",
             ha="center", va="center", fontsize=7.5)
    return fig
