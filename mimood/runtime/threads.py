"""--threads: how many CPU threads onnxruntime and PyTorch use (None: their own default, every core).

    set_threads(4)                      # before the sessions and models are made (the CLI does it first)
    options = session_options(ort)      # onnxruntime SessionOptions with it

onnxruntime takes the count per session (SessionOptions.intra_op_num_threads), so every session the runtime makes
starts from `session_options`; PyTorch takes it process-wide (torch.set_num_threads, and OMP_NUM_THREADS for a
torch imported later); numpy's BLAS reads OMP_NUM_THREADS when it loads.
"""
from __future__ import annotations

import os
import sys

THREADS: int | None = None


def set_threads(n: int | None) -> None:
    """Use n CPU threads from now on (None: leave the defaults)."""
    global THREADS
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads {n}: must be at least 1")
    THREADS = int(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:                 # imported already: tell it; otherwise it reads OMP_NUM_THREADS
        sys.modules["torch"].set_num_threads(n)


def session_options(ort):
    """A fresh `ort.SessionOptions` using THREADS intra-op threads (and one inter-op thread) when set."""
    options = ort.SessionOptions()
    if THREADS is not None:
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
    return options
