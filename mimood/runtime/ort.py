"""The onnxruntime backend: the four exported graphs in four `InferenceSession`s, arrays on the host (numpy).

The CUDA execution provider is used when this onnxruntime has it (the `onnxruntime-gpu` build) and the
caller did not ask for the CPU; onnxruntime silently falls back to the CPU when a provider fails to load
(a missing CUDA/cuDNN library), so the providers each session actually uses are checked, and a fallback is
an error rather than a slow run that claims to be on the GPU.

On the CPU provider at fp32 the ATD and MVTM step run the exporter's onnxruntime-only copies of their graphs
where the export has them (`Bundle.ort_graph`: the attention fused into contrib MultiHeadAttention, a
flash-attention kernel; same inputs and outputs, validated against PyTorch at export).

Arrays stay numpy between steps because `restore()` thresholds the detector output on the host (to count
masked tokens and stop early); with the CUDA provider that costs one small copy per step and graph (a few
hundred kB per batch), which is negligible next to the transformer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mimood.contract import GRAPHS
from mimood.errors import InputError
from mimood.runtime.bundle import Bundle
from mimood.runtime.threads import session_options

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def ort_providers(device: str | None = None) -> list[str]:
    """Providers for `device` ("cuda", "cpu" or None = CUDA when this onnxruntime has it)."""
    import onnxruntime as ort

    has_cuda = CUDA in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise ValueError("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    return [CUDA, CPU] if has_cuda and device != "cpu" else [CPU]


class OrtEngine:
    """`mimood.restore.Engine` over onnxruntime sessions of one export folder."""

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str | None = None):
        import onnxruntime as ort

        self.name, self.manifest, self.precision = "ort", bundle.manifest, precision
        self.R, self.batch = bundle.manifest.R, bundle.manifest.batch
        providers = ort_providers(device)
        options = session_options(ort)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions, fused = {}, []
        for step in GRAPHS:
            path = bundle.ort_graph(step) if precision == "fp32" and providers[0] == CPU else None
            fused += [step] if path is not None else []
            self.sessions[step] = _session(ort, path or bundle.graph(step, precision), options, providers)
        self.provider = providers[0]
        self.detail = f"ort {precision} {self.provider}" + (f" (fused attention: {', '.join(fused)})" if fused else "")

    def _run(self, step: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.sessions[step].run(None, feeds)[0]

    def put(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a)

    def get(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)

    def repeat(self, tokens: np.ndarray) -> np.ndarray:
        return np.repeat(tokens, self.R, axis=0)                             # [B*R, N], slice-major

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self._run("encode", {"x": x})                                 # [B, N] int32

    def detect(self, tokens: np.ndarray) -> np.ndarray:
        return self._run("atd", {"tokens": tokens})                          # [B*R, N] float32

    def mvtm_step(self, tokens: np.ndarray, mask: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return self._run("mvtm_step", {"tokens": tokens, "mask": mask, "noise": noise})

    def decode_score(self, tokens: np.ndarray, x: np.ndarray) -> np.ndarray:
        return self._run("decode_score", {"tokens": tokens, "x": x})         # [B, H, W] float32


def _session(ort, path: Path, options, providers: list[str]):
    try:
        sess = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise InputError(path, f"onnxruntime cannot load this graph: {e}") from None
    used = sess.get_providers()
    if used[0] != providers[0]:
        raise RuntimeError(f"{path.name}: onnxruntime asked for {providers[0]} but runs on {used} "
                           "(a CUDA/cuDNN library failed to load? see onnxruntime's log)")
    return sess
