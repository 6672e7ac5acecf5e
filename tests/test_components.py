"""Connected components and lesion statistics on a hand-made mask: an anisotropic, non-RAS grid whose first voxel
axis runs superior -> inferior, with components of known size, a speck and a corner-touching voxel."""
import nibabel as nib
import numpy as np
import pytest

from mimood.runtime.components import STAT_COLUMNS, LesionStats, label_components, lesion_stats, superior_axis

# voxel axis 0 -> world -z (2.5 mm, index grows toward inferior), axis 1 -> +x (0.8 mm), axis 2 -> -y (1.2 mm)
AFFINE = np.array([[0.0, 0.8, 0.0, -40.0],
                   [0.0, 0.0, -1.2, 60.0],
                   [-2.5, 0.0, 0.0, 35.0],
                   [0.0, 0.0, 0.0, 1.0]])
VOXEL_ML = 2.5 * 0.8 * 1.2 / 1000           # 0.0024 ml
SHAPE = (30, 20, 12)


def hand_made_mask():
    mask = np.zeros(SHAPE, bool)
    mask[2:8, 3:9, 1:6] = True               # A: 6 x 6 x 5 = 180 voxels = 0.432 ml
    mask[15:25, 5:15, 4:10] = True           # B: 10 x 10 x 6 = 600 voxels = 1.44 ml (the largest)
    mask[28, 18, 0] = True                   # C: a one-voxel speck
    return mask


def test_the_grid_is_what_the_test_says():
    assert "".join(nib.aff2axcodes(AFFINE)) == "IRP"
    assert superior_axis(AFFINE) == (0, False)


def test_statistics_of_known_components():
    kept, s = lesion_stats(hand_made_mask(), AFFINE, min_ml=0.1)
    assert s.components == 2 and s.removed_components == 1
    assert s.removed_ml == pytest.approx(VOXEL_ML)
    assert s.flagged_ml == pytest.approx(780 * VOXEL_ML)
    assert s.largest_ml == pytest.approx(1.44)
    centre = AFFINE[:3, :3] @ np.array([19.5, 9.5, 6.5]) + AFFINE[:3, 3]      # B's voxel centre -> world
    assert (s.largest_r_mm, s.largest_a_mm, s.largest_s_mm) == pytest.approx(tuple(centre))
    assert centre[2] == pytest.approx(35 - 2.5 * 19.5)                         # superior = -2.5 mm per index
    assert (s.slice_axis, s.largest_slice_first, s.largest_slice_last) == (0, 15, 24)
    assert kept.sum() == 780 and not kept[28, 18, 0]                           # the speck is out of the mask
    assert set(s.row()) == set(STAT_COLUMNS)                                   # every column has its unit


def test_the_minimum_size_drops_whole_components():
    _, s = lesion_stats(hand_made_mask(), AFFINE, min_ml=0.5)                 # A (0.432 ml) goes too
    assert (s.components, s.removed_components) == (1, 2)
    assert s.flagged_ml == pytest.approx(1.44)
    _, s = lesion_stats(hand_made_mask(), AFFINE, min_ml=0)                   # 0 keeps every voxel
    assert s.components == 3 and s.flagged_ml == pytest.approx(781 * VOXEL_ML)


def test_connectivity_corner_touching_voxel():
    mask = hand_made_mask()
    mask[25, 15, 10] = True                  # touches B's corner voxel (24, 14, 9) only at a corner
    labels, sizes, _, _ = label_components(mask, VOXEL_ML, min_ml=0)           # default: 26-connected
    assert sizes.tolist() == [601, 180, 1]
    assert labels[25, 15, 10] == labels[20, 10, 7] == 1                        # 1 = the largest
    _, sizes, _, _ = label_components(mask, VOXEL_ML, min_ml=0, connectivity=1)  # faces only
    assert sizes.tolist() == [600, 180, 1, 1]


def test_an_empty_mask():
    kept, s = lesion_stats(np.zeros(SHAPE, bool), AFFINE)
    assert not kept.any()
    assert s == LesionStats(0, 0.0, None, None, None, None, None, None, 0, 0, 0.0, 0.5)
