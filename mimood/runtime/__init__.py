"""The lean runtime: an export folder in, anomaly maps out, on TensorRT, onnxruntime or PyTorch.

Every backend implements `mimood.restore.Engine` and runs the one restoration loop `mimood.restore.restore`
(`batching` packs slices into the graphs' fixed batches). Reads only the export folder (`bundle`) and never
imports the training code (`mimood.train`); the onnxruntime path imports no torch, MONAI, scikit-learn or
matplotlib (tests/test_runtime_only.py).

The names below load on first use (PEP 562), so `mimood-infer --help` and `import mimood.runtime.bundle` do
not pay for nibabel, scipy and onnxruntime.
"""
from importlib import import_module

_NAMES = {"infer_slices": "mimood.runtime.batching", **{name: "mimood.runtime.infer" for name in (
    "BACKENDS", "InferJob", "Report", "ScanState", "infer_folder", "load_engine", "pick_backend")}}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'mimood.runtime' has no attribute {name!r}")
    return getattr(import_module(_NAMES[name]), name)
