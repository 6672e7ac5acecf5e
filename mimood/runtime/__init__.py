"""The lean runtime: an export folder in, anomaly maps out, on TensorRT, onnxruntime or PyTorch.

Every backend implements `mimood.restore.Engine` and runs the one restoration loop `mimood.restore.restore`
(`batching` packs slices into the graphs' fixed batches). Reads only the export folder (`bundle`) and never
imports the training code (`mimood.train`).
"""
from mimood.runtime.batching import infer_slices
from mimood.runtime.infer import BACKENDS, Report, infer_folder, load_engine, pick_backend

__all__ = ["BACKENDS", "Report", "infer_folder", "infer_slices", "load_engine", "pick_backend"]
