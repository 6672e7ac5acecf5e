"""Checking exported graphs: run them in onnxruntime and compare with PyTorch (their I/O: `mimood.contract.graph_io`).

Every graph is compared with the PyTorch module it came from before the export calls it done;
the `Check` results go into the manifest. Float outputs pass when every element is within
`atol + rtol * |want|` (numpy's `allclose` rule); integer outputs (token ids) must be equal,
except for a stated share of mismatches (`max_mismatch_share`), because fp16 logits may move a
sampled token that lies on a CDF boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mimood.errors import InputError


def run_onnx(path: str | Path, feeds: dict[str, np.ndarray],
             providers: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run a graph once in onnxruntime (CPU unless `providers` says otherwise): outputs by name."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "ONNX file not found")
    try:
        sess = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise InputError(path, f"onnxruntime cannot load this graph: {e}") from None
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


@dataclass
class Check:
    """The result of comparing one output with its reference."""
    name: str
    passed: bool
    max_abs_err: float        # max |got - want| (inf on a shape mismatch)
    mismatch_share: float     # share of elements outside tolerance (ints: not equal)
    atol: float
    rtol: float
    max_mismatch_share: float
    problem: str = ""         # set when shapes or kinds differ

    def __str__(self) -> str:
        verdict = "ok  " if self.passed else "FAIL"
        if self.problem:
            return f"{verdict} {self.name}: {self.problem}"
        return (f"{verdict} {self.name}: max|err| {self.max_abs_err:.3g} (atol {self.atol:g}, "
                f"rtol {self.rtol:g}), mismatches {self.mismatch_share:.2%} "
                f"(allowed {self.max_mismatch_share:.2%})")


def compare(name: str, got, want, atol: float, rtol: float = 0.0,
            max_mismatch_share: float = 0.0) -> Check:
    """Compare `got` (graph output) with `want` (PyTorch reference); arrays or CPU tensors."""
    got, want = np.asarray(got), np.asarray(want)
    fail = dict(name=name, passed=False, max_abs_err=float("inf"), mismatch_share=1.0,
                atol=atol, rtol=rtol, max_mismatch_share=max_mismatch_share)
    if got.shape != want.shape:
        return Check(**fail, problem=f"shape {got.shape} != expected {want.shape}")
    is_float = [np.issubdtype(a.dtype, np.floating) for a in (got, want)]
    if is_float[0] != is_float[1]:
        return Check(**fail, problem=f"dtype {got.dtype} != expected {want.dtype}")
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))  # [...]
    if is_float[0]:
        bad = ~(diff <= atol + rtol * np.abs(want.astype(np.float64)))  # NaN counts as bad
    else:
        bad = got != want
    share = float(bad.mean()) if bad.size else 0.0
    max_err = float(diff.max()) if diff.size else 0.0  # NaN if any element is NaN
    return Check(name=name, passed=share <= max_mismatch_share, max_abs_err=max_err,
                 mismatch_share=share, atol=atol, rtol=rtol,
                 max_mismatch_share=max_mismatch_share)


# -- the seed rule: maps of a sampled restoration --------------------------------------------------------------
SEED_RULE = ("mean_abs_err", "mask_disagreement")


def map_agreement(ref: np.ndarray, got: np.ndarray, brain: np.ndarray, threshold: float | None) -> dict[str, float]:
    """How far maps got are from ref [S, H, W] inside brain [S, H, W]: mean |got - ref| and, with a mask
    threshold, the share of brain voxels whose mask decision differs."""
    d = np.abs(got - ref)[brain]
    out = {"mean_abs_err": float(d.mean()) if d.size else 0.0}
    if threshold is not None:
        out["mask_disagreement"] = float(((ref[brain] > threshold) != (got[brain] > threshold)).mean()) \
            if d.size else 0.0
    return out


def seed_rule(got: dict[str, float], yardstick: dict[str, float]) -> dict[str, bool]:
    """A graph whose maps are another sample of the restoration (fp16, int8: a few draws flip, and diverge over
    the iterations) passes when it moves the maps no more than the reference's own sampling does: each of
    SEED_RULE that both measured is at most the yardstick's, the reference run again with another seed
    (benchmarks/runtime_maps.py, mimood.export.quantize)."""
    return {k: bool(got[k] <= yardstick[k]) for k in SEED_RULE if k in got and k in yardstick}
