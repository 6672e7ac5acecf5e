"""Self-describing model checkpoints: safetensors weights whose metadata carry the model kind and its config,
so `load_model(path)` rebuilds the module with no pickled code and no run folder."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mimood.config import DAEConfig, TransformerConfig, VQConfig, from_dict
from mimood.contract import atomic_write
from mimood.errors import InputError
from mimood.models.transformer import TASKS, TokenTransformer
from mimood.models.vqvae import VQVAE

KINDS = ("vqvae",) + TASKS + ("dae",)
CONFIGS = {"vqvae": VQConfig, "dae": DAEConfig, **{t: TransformerConfig for t in TASKS}}


def build_model(kind: str, config: VQConfig | TransformerConfig | DAEConfig) -> nn.Module:
    if kind == "vqvae":
        return VQVAE(config)
    if kind in TASKS:
        return TokenTransformer(config, kind)
    if kind == "dae":
        from mimood.models.dae import DAE
        return DAE(config)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def save_model(model: nn.Module, path: str | Path, kind: str, meta: dict[str, Any] | None = None) -> None:
    """Write weights + {kind, config, meta} atomically to a .safetensors file."""
    model = getattr(model, "module", model)            # unwrap DistributedDataParallel
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"kind": kind, "config": json.dumps(asdict(model.cfg)), "meta": json.dumps(meta or {})}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_info(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint: {"kind", "config" (dict), "meta" (dict)}."""
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for non-safetensors files
        raise InputError(path, f"not a mimood checkpoint ({e})") from None
    if "kind" not in md or "config" not in md:
        raise InputError(path, "not a mimood checkpoint (no kind/config metadata)")
    return {"kind": md["kind"], "config": json.loads(md["config"]), "meta": json.loads(md.get("meta", "{}"))}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from its checkpoint alone; returns (model in eval mode, info)."""
    info = read_info(path)
    if info["kind"] not in CONFIGS:
        raise InputError(path, f"unknown model kind {info['kind']!r} (expected one of {', '.join(KINDS)})")
    model = build_model(info["kind"], from_dict(CONFIGS[info["kind"]], info["config"]))
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict(state)
    return model.to(device).eval(), info
