"""The PyTorch backend: the reference `TorchEngine` (the four graph modules of `mimood.models.graphs` in eager
mode, the engine every other backend is checked against), on the export folder's checkpoints or a run's, and
on a GPU the same engine with its two per-iteration steps (ATD and MVTM step) replayed from CUDA graphs.

Each loop iteration launches a few hundred small kernels; a CUDA graph records them once and replays them
with one launch. A graph reads and writes fixed addresses, so each step gets static input buffers (copied
into before a replay) and one captured output, per input shape (a folder has one shape: the manifest's
batch). Capture follows the PyTorch recipe: warm-up on a side stream (cuBLAS/cuDNN pick their kernels and
workspaces there, outside the capture), then `torch.cuda.graph`; autocast's weight-cast cache is off, as
captured graphs require. Encoding and decoding run once per batch and stay eager.

Not run on this project's CPU-only CI: the GPU path is exercised only where a CUDA GPU is present.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mimood.config import RestoreConfig, RunConfig
from mimood.contract import WEIGHTS
from mimood.models.checkpoint import load_model
from mimood.models.graphs import ATDGraph, DecodeScore, EncodeGraph, MVTMStep
from mimood.runtime.bundle import Bundle


class TorchEngine:
    """The PyTorch reference engine: the four graph modules in eager mode (fp32 unless `autocast` names a
    dtype). `detector="mvtm_nll"` swaps the ATD for the MVTM likelihood baseline (see mimood.eval)."""

    def __init__(self, vqvae, atd, mvtm, cfg: RestoreConfig, device: str | torch.device = "cpu",
                 autocast: torch.dtype | None = None, detector=None):
        self.name = "torch"
        self.R = cfg.R
        self.device = torch.device(device)
        self.autocast = autocast
        self.encoder = EncodeGraph(vqvae).to(self.device).eval()
        self.detector = (ATDGraph(atd) if detector is None else detector).to(self.device).eval()
        self.sampler = MVTMStep(mvtm, cfg.temperature).to(self.device).eval()
        self.scorer = DecodeScore(vqvae, cfg.R, cfg.min_pool, cfg.avg_pool, cfg.residual).to(self.device).eval()

    @classmethod
    def from_run(cls, run, cfg: RestoreConfig | None = None, **kwargs) -> "TorchEngine":
        """Load the best checkpoints of a run folder."""
        run = Path(run)
        cfg = cfg or RunConfig.load(run / "config.json").restore
        models = {k: load_model(run / k / "best.safetensors")[0] for k in WEIGHTS}
        return cls(models["vqvae"], models["atd"], models["mvtm"], cfg, **kwargs)

    def _ctx(self):
        return torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                              enabled=self.autocast is not None)

    def put(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device)

    def get(self, a: torch.Tensor) -> np.ndarray:
        return a.detach().float().cpu().numpy() if a.is_floating_point() else a.detach().cpu().numpy()

    def repeat(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.repeat_interleave(self.R, dim=0)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with self._ctx():
            return self.encoder(x)

    @torch.no_grad()
    def detect(self, tokens: torch.Tensor) -> torch.Tensor:
        with self._ctx():
            return self.detector(tokens).float()

    @torch.no_grad()
    def mvtm_step(self, tokens: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with self._ctx():
            return self.sampler(tokens, mask, noise)

    @torch.no_grad()
    def decode_score(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with self._ctx():
            return self.scorer(tokens, x).float()


def load_torch_engine(bundle: Bundle, precision: str = "fp32", device: str | None = None,
                      cuda_graphs: bool = True) -> TorchEngine:
    """TorchEngine (CPU or CUDA eager) or CudaGraphEngine (CUDA, unless cuda_graphs=False: `mimood-bench`'s
    eager reference) on the export's checkpoints. fp16 = autocast on a GPU (on the CPU fp16 kernels are slow or
    missing); bf16 = autocast on either (on CPUs with AVX-512 bf16 it is 1.2-2x faster than fp32 eager;
    `mimood-bench` measures it)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "fp16" and not device.startswith("cuda"):
        raise ValueError("--precision fp16 with the torch backend needs a CUDA GPU")
    models = {k: load_model(bundle.weights(k), device=device)[0] for k in WEIGHTS}
    cls = CudaGraphEngine if device.startswith("cuda") and cuda_graphs else TorchEngine
    engine = cls(models["vqvae"], models["atd"], models["mvtm"], bundle.restore_config(), device=device,
                 autocast={"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision))
    engine.manifest, engine.batch, engine.precision = bundle.manifest, bundle.manifest.batch, precision
    engine.detail = f"torch {precision} {device}" + (" cuda-graphs" if cls is CudaGraphEngine else " eager")
    return engine


class CudaGraphEngine(TorchEngine):
    """TorchEngine whose `detect` and `mvtm_step` replay CUDA graphs. Their outputs are the graphs' static
    buffers, overwritten by the next replay of the same step; `restore()` reads each one before that."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    def _ctx(self):
        return torch.autocast("cuda", dtype=self.autocast or torch.float32, enabled=self.autocast is not None,
                              cache_enabled=False)

    @torch.no_grad()
    def _replay(self, step: str, fn, *inputs: torch.Tensor) -> torch.Tensor:
        key = (step,) + tuple((tuple(t.shape), t.dtype) for t in inputs)
        if key not in self.graphs:
            static = [t.clone() for t in inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), self._ctx():
                for _ in range(3):
                    fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), self._ctx():
                out = fn(*static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for buf, t in zip(static, inputs):
            buf.copy_(t)
        graph.replay()
        return out

    def detect(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._replay("atd", self.detector, tokens)                  # [B*R, N] float32

    def mvtm_step(self, tokens: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._replay("mvtm_step", self.sampler, tokens, mask, noise)  # [B*R, N] int32
