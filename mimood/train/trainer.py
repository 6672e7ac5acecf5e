"""One small trainer for every model: AdamW, warmup + cosine annealing, gradient clipping, optional CPU bf16
autocast, periodic validation, `last` and `best` checkpoints, a JSON-lines log, exact resume, and
DistributedDataParallel when launched with torchrun.

The task-specific parts come in as two callables:
    loss_fn(model, step, rng) -> (loss, metrics)       one training batch, drawn from `rng`
    val_fn(model) -> metrics (must contain "loss")      deterministic validation on held-out data
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from mimood.config import OptimConfig
from mimood.contract import atomic_write
from mimood.models.checkpoint import save_model

LossFn = Callable[[nn.Module, int, np.random.Generator], tuple[torch.Tensor, dict[str, float]]]
ValFn = Callable[[nn.Module], dict[str, float]]


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup, then cosine annealing to zero at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def weights_digest(model: nn.Module) -> str:
    """sha256 over all parameters and buffers (to check that DDP ranks agree)."""
    h = hashlib.sha256()
    for k, v in sorted(getattr(model, "module", model).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class TrainResult:
    steps: int
    best_val: dict[str, float]
    last_val: dict[str, float]
    seconds: float


class Trainer:
    def __init__(self, model: nn.Module, kind: str, cfg: OptimConfig, out: Path, seed: int,
                 after_step: Callable[[nn.Module, int], None] | None = None):
        self.kind, self.cfg, self.out, self.seed = kind, cfg, Path(out), seed
        self.rank, self.world = world()
        self.model = model
        self.after_step = after_step
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]   # biases, norms, position table: no weight decay
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.ddp = (torch.nn.parallel.DistributedDataParallel(model) if self.world > 1 else model)
        self.step = 0
        self.best = {"loss": float("inf")}
        self.rng = np.random.default_rng([seed, self.rank])
        torch.manual_seed(seed * 1000 + self.rank)
        self.out.mkdir(parents=True, exist_ok=True)

    # -- checkpoints ----------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"

    def save(self, val: dict[str, float]) -> None:
        if self.rank != 0:
            return
        meta = {"step": self.step, "val": val, "seed": self.seed}
        save_model(self.model, self.out / "last.safetensors", self.kind, meta)
        state = {"step": self.step, "optimizer": self.opt.state_dict(), "best": self.best,
                 "rng": json.dumps(self.rng.bit_generator.state), "torch_rng": torch.get_rng_state()}
        with atomic_write(self.state_path) as tmp:
            torch.save(state, tmp)

    def resume(self) -> bool:
        """Continue from `last.safetensors` + `state.pt` if present; returns whether it did."""
        last = self.out / "last.safetensors"
        if not (last.exists() and self.state_path.exists()):
            return False
        from safetensors.torch import load_file
        self.model.load_state_dict(load_file(str(last)))
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.best = int(state["step"]), dict(state["best"])
        if self.rank == 0:   # other ranks keep their own streams (different batches per rank)
            self.rng.bit_generator.state = json.loads(state["rng"])
            torch.set_rng_state(state["torch_rng"])
        return True

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop -------------------------------------------------------------------------------------------
    def fit(self, loss_fn: LossFn, val_fn: ValFn, progress: bool = True) -> TrainResult:
        cfg, t0 = self.cfg, time.time()
        last_val: dict[str, float] | None = None        # stays {} on ranks > 0 (validation runs on rank 0)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {self.kind}", unit="step",
                   disable=not progress or self.rank != 0, dynamic_ncols=True)
        while self.step < cfg.steps:
            self.ddp.train()
            for group in self.opt.param_groups:
                group["lr"] = lr_at(self.step, cfg)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, metrics = loss_fn(self.ddp, self.step, self.rng)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.step += 1
            if self.after_step is not None:
                self.after_step(self.model, self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_at(self.step - 1, cfg):.2e}")
            if self.step % 10 == 0 or self.step == cfg.steps:
                self.log({"step": self.step, "loss": loss.item(), "lr": lr_at(self.step - 1, cfg), **metrics})
            if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                last_val = self.validate(val_fn)
        bar.close()
        if last_val is None:                   # resumed a finished run: report its validation again
            last_val = self.validate(val_fn, save=False)
        if self.world > 1:
            digest = weights_digest(self.model)
            (self.out / f"weights.rank{self.rank}.sha256").write_text(digest + "\n")
        return TrainResult(self.step, dict(self.best), last_val, time.time() - t0)

    def validate(self, val_fn: ValFn, save: bool = True) -> dict[str, float]:
        """Validation on rank 0 (the unwrapped module: no collective calls), then checkpoints."""
        val: dict[str, float] = {}
        if self.rank == 0:
            self.model.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
                val = {k: float(v) for k, v in val_fn(self.model).items()}
            self.log({"step": self.step, **{f"val_{k}": v for k, v in val.items()}})
            if save:
                if val["loss"] < self.best["loss"]:
                    self.best = {"step": self.step, **val}
                    save_model(self.model, self.out / "best.safetensors", self.kind,
                               {"step": self.step, "val": val, "seed": self.seed})
                self.save(val)
        if self.world > 1:
            dist.barrier()
        return val
