"""The overlay PNG: panels chosen from the flagged components (not from noisy edge slices), slice numbers in the
input's voxel grid, radiological orientation with R/L markers, a colour bar with the threshold, and a clean skip
without matplotlib."""
import sys

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from mimood.config import DataConfig
from mimood.data.preprocess import preprocess
from mimood.runtime.overlay import NO_MATPLOTLIB, input_slice, overlay_figure, pick_panels, write_overlay

THRESHOLD = 0.3
# LAS, 1.5 mm between axial slices (so preprocessing resamples to 1 mm), an offset origin
AFFINE = np.array([[-1.0, 0, 0, 30], [0, 1.0, 0, -20], [0, 0, 1.5, -10], [0, 0, 0, 1]])


def scan(affine=AFFINE, shape=(90, 100, 40)):
    """A textured ellipsoid 'brain': preprocess cuts it into slices whose first and last ones hold little brain."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = (x / 0.9) ** 2 + (y / 0.9) ** 2 + (z / 1.05) ** 2 <= 1
    return nib.Nifti1Image(np.where(brain, rng.uniform(50, 150, shape), 0).astype(np.float32), affine)


@pytest.fixture(scope="module")
def slices():
    return preprocess(scan(), DataConfig())


def edge_rows(s):
    area = s.brain.sum(axis=(1, 2))
    return np.flatnonzero(area < 0.25 * area.max())


def lesion_and_noise(s, lesion_rows, box=(60, 72, 50, 62)):
    """maps [S, H, W]: a 12 x 12 px lesion on `lesion_rows`; the edge slices flooded (a large flagged component
    that is noise), specks on every slice (removed by the size filter)."""
    maps = np.zeros_like(s.images)
    r0, r1, c0, c1 = box
    maps[lesion_rows, r0:r1, c0:c1] = 0.6
    maps[edge_rows(s)] = 0.9                                                 # flooded edge slices
    specks = np.random.default_rng(1).uniform(size=maps.shape) > 0.995      # isolated specks, 0.5% of pixels
    maps[specks] = np.maximum(maps[specks], 0.9)
    return np.where(s.brain, maps, 0).astype(np.float32)


def test_panels_show_the_lesion_not_the_flooded_edge_slices(slices):
    edge = edge_rows(slices)
    mid = len(slices.index) // 2
    lesion = np.arange(mid - 3, mid + 4)                                     # 7 slices x 144 px = 1.0 ml
    maps = lesion_and_noise(slices, lesion)
    p = pick_panels(slices, maps, THRESHOLD, n=2)
    assert len(edge) >= 4 and p.removed > 50
    shown = set(p.component)
    assert len(shown) == 1 and 0 not in shown
    lesion_ml = p.component_ml[shown.pop() - 1]
    assert lesion_ml == pytest.approx(7 * 144 / 1000, rel=0.1)
    assert p.component_ml[0] > 2 * lesion_ml                                  # the edge flood is bigger
    assert set(p.rows) <= set(lesion) and not set(p.rows) & set(edge)
    assert abs(p.rows[1] - p.rows[0]) >= 4                                   # spread, not neighbours
    assert pick_panels(slices, maps, THRESHOLD, n=1).rows[0] in lesion


def test_a_second_lesion_is_not_pushed_out_by_the_first(slices):
    mid = len(slices.index) // 2
    maps = lesion_and_noise(slices, np.arange(mid - 8, mid + 9), box=(40, 70, 40, 70))     # big
    maps[mid + 5:mid + 9, 95:107, 95:107] = np.where(slices.brain[mid + 5:mid + 9, 95:107, 95:107], 0.6, 0)
    p = pick_panels(slices, maps, THRESHOLD, n=4)
    big, small = p.labels[mid, 55, 55], p.labels[mid + 6, 100, 100]
    assert big == 1 and small > 1 and p.component_ml[small - 1] == pytest.approx(0.576, rel=0.1)
    assert small in p.component and p.component.count(big) >= 2            # both shown, the big one more


def test_without_a_threshold_core_slices_with_most_map(slices):
    maps = np.zeros_like(slices.images)
    maps[edge_rows(slices)] = 1.0
    maps[20, 60:70, 60:70] = 0.2
    p = pick_panels(slices, np.where(slices.brain, maps, 0), None, n=1)
    assert p.rows.tolist() == [20] and p.components == 0


def test_a_bright_partial_volume_pixel_does_not_push_the_lesion_out(slices):
    """(Moved from tests/test_infer.py with the old outputs.overlay_slices.) One very bright pixel on the first and
    last slice of the brain peaks higher than the lesion; the panels still show the lesion, and map values outside
    the brain do not count."""
    mid = len(slices.index) // 2
    maps = np.zeros_like(slices.images)
    first, last = 0, len(maps) - 1
    for r in (first, last):
        y, x = np.argwhere(slices.brain[r])[0]
        maps[r, y, x] = 0.99
    maps[mid - 4:mid + 5, 60:72, 60:72] = 0.5                               # 9 slices x 144 px = 1.3 ml
    maps = np.where(slices.brain, maps, 0).astype(np.float32)
    p = pick_panels(slices, maps, THRESHOLD, n=2)
    assert all(mid - 4 <= r <= mid + 4 for r in p.rows) and p.removed == 2   # the two pixels: specks, dropped
    outside = np.zeros_like(maps)
    outside[mid, ~slices.brain[mid]] = 0.9                                   # outside the brain: not flagged
    assert pick_panels(slices, outside, THRESHOLD, n=1).components == 0


@pytest.mark.parametrize("flip", [False, True])
def test_slice_numbers_are_the_inputs_own(flip):
    """A box at input slices 10..13 (of 40, 1.5 mm) shows up on panels numbered 10..13, whichever way the input's
    axial axis runs (here also flipped: index growing toward inferior)."""
    affine = AFFINE.copy()
    if flip:
        affine[2, 2], affine[2, 3] = -1.5, 50.0
    img = scan(affine)
    label = np.zeros(img.shape, np.float32)
    label[30:50, 40:60, 10:14] = 1
    s = preprocess(img, DataConfig(), label=nib.Nifti1Image(label, affine))
    assert s.geometry.resampled
    maps = np.where(s.brain, s.labels * 0.6, 0).astype(np.float32)
    p = pick_panels(s, maps, THRESHOLD, n=2)
    assert p.axis == 2 and p.components == 1
    assert all(10 <= k <= 13 for k in p.slices)
    axis, k = input_slice(s.geometry, int(s.index[0]))
    assert axis == 2 and k == (0 if not flip else 39)                       # the lowest slice, in input numbers


def test_figure_is_radiological_with_markers_colour_bar_and_score(slices):
    mid = len(slices.index) // 2
    maps = np.zeros_like(slices.images)
    # a lesion in the patient's RIGHT hemisphere: display columns run from the patient's left, so the right end
    maps[mid - 3:mid + 4, 70:80, 110:125] = 0.6
    maps = np.where(slices.brain, maps, 0).astype(np.float32)
    fig = overlay_figure("case", slices, maps, THRESHOLD, score=0.973, score_name="ood.mirror", n=2)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2
    for ax in panels:
        marks = {t.get_text(): t.get_position()[0] for t in ax.texts}
        assert marks["R"] < 0.5 < marks["L"]                                 # R on the image's left
        heat = np.asarray(ax.images[1].get_array())                          # the map as drawn
        cols = np.flatnonzero(heat.max(axis=0) > THRESHOLD)
        assert cols.size and cols.max() < heat.shape[1] / 2                 # the right lesion on the left half
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "scan score 0.973 (ood.mirror)" in fig._suptitle.get_text()
    assert "radiological view: patient's right on image left" in texts
    bar = [ax for ax in fig.axes if not ax.images]
    assert len(bar) == 1
    labels = [t.get_text() for t in bar[0].get_yticklabels()]
    assert any("threshold" in t and "0.3" in t for t in labels)
    assert any(abs(line.get_ydata()[0] - THRESHOLD) < 1e-9 for line in bar[0].lines)   # the threshold line

    raw = overlay_figure("case", slices, maps, THRESHOLD, score=8.31, score_name="map", n=1, calibrated=False)
    assert "raw map score 8.31 (no healthy reference: not in [0, 1])" in raw._suptitle.get_text()

    neuro = overlay_figure("case", slices, maps, THRESHOLD, radiological=False, n=1)
    ax = [a for a in neuro.axes if a.images][0]
    marks = {t.get_text(): t.get_position()[0] for t in ax.texts}
    assert marks["L"] < 0.5 < marks["R"]
    assert "neurological view" in " ".join(t.get_text() for t in neuro.texts)


def test_png_written_and_clean_skip_without_matplotlib(slices, tmp_path, monkeypatch):
    maps = np.zeros_like(slices.images)
    assert write_overlay(tmp_path / "a.png", "a", slices, maps, THRESHOLD, score=0.5, score_name="map") == ""
    h, w, _ = matplotlib.image.imread(str(tmp_path / "a.png")).shape
    assert w > 2.5 * h and list(tmp_path.iterdir()) == [tmp_path / "a.png"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)                     # import matplotlib -> ImportError
    assert write_overlay(tmp_path / "b.png", "b", slices, maps, THRESHOLD) == NO_MATPLOTLIB
    assert not (tmp_path / "b.png").exists()
