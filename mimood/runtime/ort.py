"""The onnxruntime backend: the four exported graphs in `InferenceSession`s, arrays on the host (numpy).

The CUDA execution provider is used when this onnxruntime has it (the `onnxruntime-gpu` build) and the
caller did not ask for the CPU; onnxruntime silently falls back to the CPU when a provider fails to load
(a missing CUDA/cuDNN library), so the providers each session actually uses are checked, and a fallback is
an error rather than a slow run that claims to be on the GPU.

On the CPU provider at fp32 the ATD and MVTM step run the exporter's onnxruntime-only copies of their graphs
where the export has them (`Bundle.ort_graph`: the attention fused into contrib MultiHeadAttention, a
flash-attention kernel; same inputs and outputs, validated against PyTorch at export); at int8 their int8
copies (`Bundle.int8_graph`, those the export's map check accepted), the other steps in fp32.

Arrays stay numpy between steps because `restore()` thresholds the detector output on the host (to count
masked tokens and stop early); with the CUDA provider that costs one small copy per step and graph (a few
hundred kB per batch), which is negligible next to the transformer.

Rows (CPU, exports whose onnxruntime-only copies take any number of rows): the transformer steps, 94% of the
loop, run only the rows whose result can change, and each distinct row once:
- `detect(tokens, active)` (the `skips_rows` protocol of `mimood.restore`): the active rows (not padding, not
  settled), deduplicated (before the first MVTM step the R copies of a slice are one row); the others score 0.
- `mvtm_step`: the rows with a masked token (the others come back unchanged, as from the full graph).
Row i of these graphs depends on row i alone, so this changes no result (`tests/test_ort_rows.py`).
The rows are cut into `threads` contiguous parts, each run by its own single-threaded session in a thread of
its own (onnxruntime releases the GIL): no barrier between the cores after every operator, as in one
session with two intra-op threads. Measured on the ATD (cpu preset, 128 rows, the shared 2-core machine under
load 9-10): 1.30x faster than one session with two threads, the outputs bit-identical. Static-shape graphs
(encode, decode_score, the CUDA provider, older exports) run in one session with `threads` intra-op threads.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mimood.contract import GRAPHS, ROW_GRAPHS
from mimood.errors import InputError
from mimood.runtime.bundle import Bundle
from mimood.runtime import threads as threads_module

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def ort_providers(device: str | None = None) -> list[str]:
    """Providers for `device` ("cuda", "cpu" or None = CUDA when this onnxruntime has it)."""
    import onnxruntime as ort

    has_cuda = CUDA in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise ValueError("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    return [CUDA, CPU] if has_cuda and device != "cpu" else [CPU]


class OrtEngine:
    """`mimood.restore.Engine` over onnxruntime sessions of one export folder.

    precision "int8": the transformer steps run their int8 copies (`int8_steps` names which; by default those
    the export's map check accepted), the rest fp32. threads: CPU cores to use (default: those this process
    may run on)."""

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str | None = None,
                 threads: int | None = None, int8_steps: tuple[str, ...] | None = None):
        import onnxruntime as ort

        self.name, self.manifest, self.precision = "ort", bundle.manifest, precision
        self.R, self.batch = bundle.manifest.R, bundle.manifest.batch
        providers = ort_providers(device)
        cpu = providers[0] == CPU
        self.threads = max(1, threads or threads_module.THREADS or _cores())   # --threads, else every core
        if precision == "int8":
            if not cpu:
                raise ValueError("int8 graphs run on onnxruntime's CPU provider only (use device cpu)")
            if not bundle.manifest.extra.int8:
                raise InputError(bundle.folder, "no int8 graphs in this export (export it with --int8)")
        int8 = set(bundle.int8_steps() if int8_steps is None else int8_steps) if precision == "int8" else set()
        self.sessions, self.workers, fused, quantised = {}, {}, [], []
        for step in GRAPHS:
            path, rows = None, False
            if cpu and precision in ("fp32", "int8") and step in ROW_GRAPHS:
                path = bundle.int8_graph(step) if step in int8 else None
                quantised += [step] if path is not None else []
                path = path or bundle.ort_graph(step)
                fused += [step] if path is not None else []
                rows = path is not None and bundle.rows_symbolic(step)    # int8 copies have the ort copy's rows
            path = path or bundle.graph(step, "fp32" if precision == "int8" else precision)
            if rows:
                self.workers[step] = [_session(ort, path, _options(ort, 1), providers) for _ in range(self.threads)]
            else:
                self.sessions[step] = _session(ort, path, _options(ort, self.threads), providers)
        self.skips_rows = bool(self.workers)                  # mimood.restore: detect(tokens, active)
        self.pool = ThreadPoolExecutor(self.threads) if self.workers and self.threads > 1 else None
        self.provider = providers[0]
        self.detail = (f"ort {precision} {self.provider}"
                       + (f" (fused attention: {', '.join(fused)})" if fused else "")
                       + (f" (int8: {', '.join(quantised)})" if quantised else "")
                       + (f" (rows: {self.threads} x 1 thread)" if self.workers else ""))

    def _run(self, step: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.sessions[step].run(None, feeds)[0]

    def _run_rows(self, step: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """A row-wise step on n rows (every feed [n, N]), cut into one contiguous part per worker session."""
        sessions = self.workers[step]
        n = len(next(iter(feeds.values())))
        parts = min(len(sessions), n)
        if parts <= 1 or self.pool is None:
            return sessions[0].run(None, feeds)[0]
        cuts = np.linspace(0, n, parts + 1).round().astype(int)
        jobs = [self.pool.submit(s.run, None, {k: a[lo:hi] for k, a in feeds.items()})
                for s, lo, hi in zip(sessions, cuts[:-1], cuts[1:])]
        return np.concatenate([j.result()[0] for j in jobs])

    def put(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a)

    def get(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)

    def repeat(self, tokens: np.ndarray) -> np.ndarray:
        return np.repeat(tokens, self.R, axis=0)                             # [B*R, N], slice-major

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self._run("encode", {"x": x})                                 # [B, N] int32

    def detect(self, tokens: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        """ATD scores [B*R, N] float32; with row-wise graphs only of the `active` rows (host bool [B*R]; the
        others are padding or settled and score 0), each distinct row computed once."""
        if "atd" not in self.workers:
            return self._run("atd", {"tokens": tokens})
        rows = np.arange(len(tokens)) if active is None else np.flatnonzero(active)
        out = np.zeros(tokens.shape, dtype=np.float32)
        if len(rows):
            _, first, inverse = np.unique(tokens[rows], axis=0, return_index=True, return_inverse=True)
            probs = self._run_rows("atd", {"tokens": np.ascontiguousarray(tokens[rows[first]])})   # [u, N]
            out[rows] = probs[inverse.reshape(-1)]
        return out

    def mvtm_step(self, tokens: np.ndarray, mask: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Tokens [B*R, N] with the masked ones re-sampled; with row-wise graphs only the rows with a masked
        token run (the graph returns the others unchanged)."""
        if "mvtm_step" not in self.workers:
            return self._run("mvtm_step", {"tokens": tokens, "mask": mask, "noise": noise})
        rows = np.flatnonzero(mask.any(1))
        out = tokens.copy()
        if len(rows):
            out[rows] = self._run_rows("mvtm_step", {"tokens": tokens[rows], "mask": mask[rows],
                                                     "noise": noise[rows]})
        return out

    def decode_score(self, tokens: np.ndarray, x: np.ndarray) -> np.ndarray:
        return self._run("decode_score", {"tokens": tokens, "x": x})         # [B, H, W] float32


def _cores() -> int:
    """CPU cores this process may run on (its affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                       # not Linux
        return os.cpu_count() or 1


def _options(ort, threads: int):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # no spin-waiting after a run: a static graph's pool would burn the cores the row workers need next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


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
