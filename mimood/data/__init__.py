"""Data layer: NIfTI volumes <-> normalised 160 x 160 axial slices, data set discovery, demo data, augmentation.

Heavier pieces (demo data, augmentation) import torch/MONAI; import them from their modules.
"""
from mimood.data.discover import Case, check_case, discover
from mimood.data.io import atomic_write, load_volume, save_nifti
from mimood.data.preprocess import Geometry, Slices, preprocess, to_volume
from mimood.data.slices import SliceSet, build_slice_set, load_slice_set, save_slice_set, split_by_case

__all__ = ["Case", "check_case", "discover", "atomic_write", "load_volume", "save_nifti", "Geometry", "Slices",
           "preprocess", "to_volume", "SliceSet", "build_slice_set", "load_slice_set", "save_slice_set",
           "split_by_case"]
