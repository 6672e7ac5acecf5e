"""The TensorRT backend: one cached engine per loop step (`mimood.runtime.trt.ensure_engine`, built on first use
beside its ONNX file), each run by a `TrtSession` (device buffers allocated and bound once, `execute_async_v3`
on the current torch stream). Arrays are torch CUDA tensors, so the restoration loop's own operations
(repeat, threshold, count) run on the GPU between engine calls.

`trt_plan` is everything up to the engines: which ONNX file each step uses and the tensors its session will
bind (names, static shapes, dtypes), read from the manifest's record of that file (whose bytes `Bundle.open`
checked against the recorded hash, so the record is the file's own I/O; no `onnx` package is needed) and
checked against the loop contract. It needs neither TensorRT nor a GPU, so it is tested everywhere;
`TrtEngine` checks the built engines' bindings against the same plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mimood.contract import GRAPHS, expected_io, recorded_io
from mimood.errors import InputError
from mimood.runtime.bundle import Bundle
from mimood.runtime.trt import TrtSession, ensure_engine, trt_available

TIMING_CACHE = "timing.cache"           # in the export folder, shared by its engines (as mimood-export)


@dataclass
class StepPlan:
    onnx: Path
    precision: str                                        # of the graph file used
    inputs: dict[str, tuple[list[int], str]]              # tensor -> (static shape, numpy dtype name)
    outputs: dict[str, tuple[list[int], str]]


def trt_plan(bundle: Bundle, precision: str = "fp32") -> dict[str, StepPlan]:
    """Loop step -> the ONNX file an engine is built from and the I/O it binds (the manifest's record of it)."""
    want = expected_io(bundle.manifest.batch, bundle.manifest.R)
    plan = {}
    for step in GRAPHS:
        path = bundle.graph(step, precision)
        entry = next(g for g in bundle.manifest.graphs.values() if g["file"] == path.name)
        got = recorded_io(entry["inputs"], entry["outputs"])
        if got != want[step]:
            raise InputError(path, f"graph I/O {got} does not match the loop contract {want[step]}")
        plan[step] = StepPlan(path, entry["precision"], got["inputs"], got["outputs"])
    return plan


class TrtEngine:
    """`mimood.restore.Engine` over TensorRT engines. Outputs are the sessions' bound buffers, overwritten by
    the next run of the same step; `restore()` reads each one before that (and feeds a step's output back as
    its next input, which `TrtSession.run` copies into the input buffer before enqueueing)."""

    def __init__(self, bundle: Bundle, precision: str = "fp32"):
        ok, why = trt_available()
        if not ok:
            raise ValueError(f"the trt backend cannot run here: {why}")
        import torch

        self.torch = torch
        self.name, self.manifest, self.precision = "trt", bundle.manifest, precision
        self.R, self.batch = bundle.manifest.R, bundle.manifest.batch
        self.plan = trt_plan(bundle, precision)
        self.sessions = {}
        for step, p in self.plan.items():
            session = TrtSession(ensure_engine(p.onnx, p.precision, bundle.folder / TIMING_CACHE))
            bound = {name: (list(buf.shape), _np_name(buf.dtype)) for name, buf in session.buffers.items()}
            if bound != {**p.inputs, **p.outputs}:
                raise RuntimeError(f"{p.onnx.name}: engine bindings {bound} differ from the graph's "
                                   f"{ {**p.inputs, **p.outputs} }")
            self.sessions[step] = session
        self.detail = f"trt {precision} {torch.cuda.get_device_name()}"

    def _run(self, step: str, **feeds):
        return next(iter(self.sessions[step].run(feeds).values()))

    def put(self, a: np.ndarray):
        return self.torch.from_numpy(a).cuda()

    def get(self, a) -> np.ndarray:
        return a.cpu().numpy()

    def repeat(self, tokens):
        return tokens.repeat_interleave(self.R, dim=0)                      # [B*R, N], slice-major

    def encode(self, x):
        return self._run("encode", x=x)                                      # [B, N] int32

    def detect(self, tokens):
        return self._run("atd", tokens=tokens)                               # [B*R, N] float32

    def mvtm_step(self, tokens, mask, noise):
        return self._run("mvtm_step", tokens=tokens, mask=mask, noise=noise)  # [B*R, N] int32

    def decode_score(self, tokens, x):
        return self._run("decode_score", tokens=tokens, x=x)                 # [B, H, W] float32


def _np_name(dtype) -> str:
    """torch dtype -> numpy dtype name ("float32", "int32", "bool")."""
    return str(dtype).removeprefix("torch.")
