"""The four loop graphs as ONNX files: their names and signatures, the export call, and which part of
each stays fp32 in its half-precision copy.

The modules are exactly `mimood.models.graphs` (the PyTorch reference engine runs the same ones), exported
with static shapes for a batch of B slices and R restorations:

    encode.onnx        x [B,1,160,160] float32                                   -> tokens [B,400] int32
    atd.onnx           tokens [BR,400] int32                                     -> probs [BR,400] float32
    mvtm_step.onnx     tokens [BR,400] int32, mask [BR,400] bool,
                       noise [BR,400] float32                                    -> tokens_out [BR,400] int32
    decode_score.onnx  tokens [BR,400] int32, x [B,1,160,160] float32            -> maps [B,160,160] float32

B, R, the sampling temperature and the pooling sizes are baked into the graphs (the manifest records them);
lambda and T are not: the loop applies them (mimood.restore).

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). With torch 2.13 the TorchScript
exporter still runs but is deprecated; the dynamo one exports all four modules as they are (SDPA becomes
MatMul/Softmax, the VQ search MatMul + ArgMin, the sampling CumSum + Less + ReduceSum), with static shapes
when no `dynamic_shapes` is given, and folds constants.

Opset 20, the exporter's own (no version conversion): the newest opset TensorRT 10.0 parses whole, and the
first with a GELU operator. At opset 18 GELU is written out as Div/Erf/Add/Mul/Mul, an order onnxruntime's
GELU fusion does not match: the transformer graphs ran ~7% slower on the CPU. (LayerNormalization needs 17.)
"""
from __future__ import annotations

import io
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
from torch import nn

from mimood.config import GRID, IMAGE_SIZE, RestoreConfig
from mimood.export.fp16 import downstream_nodes, to_fp16
from mimood.export.manifest import write_atomic
from mimood.models.graphs import ATDGraph, DecodeScore, EncodeGraph, MVTMStep

OPSET = 20
N = GRID * GRID
GRAPHS = ("encode", "atd", "mvtm_step", "decode_score")   # in loop order
IO_NAMES = {                                               # graph -> (input names, output names)
    "encode": (["x"], ["tokens"]),
    "atd": (["tokens"], ["probs"]),
    "mvtm_step": (["tokens", "mask", "noise"], ["tokens_out"]),
    "decode_score": (["tokens", "x"], ["maps"]),
}


def build_modules(vqvae: nn.Module, atd: nn.Module, mvtm: nn.Module, cfg: RestoreConfig, R: int
                  ) -> dict[str, nn.Module]:
    """The four graph modules (eval mode, CPU) for R restorations."""
    modules = {"encode": EncodeGraph(vqvae), "atd": ATDGraph(atd),
               "mvtm_step": MVTMStep(mvtm, cfg.temperature),
               "decode_score": DecodeScore(vqvae, R, cfg.min_pool, cfg.avg_pool)}
    return {k: m.cpu().eval() for k, m in modules.items()}


def example_inputs(name: str, B: int, R: int, vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the graph's static shapes and dtypes (what the exporter traces with)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g)                       # [B, 1, H, W]
    tokens = torch.randint(0, vocab_size, (B * R, N), generator=g, dtype=torch.int32)  # [BR, N]
    if name == "encode":
        return (x,)
    if name == "atd":
        return (tokens,)
    if name == "mvtm_step":
        return tokens, torch.rand(B * R, N, generator=g) < 0.3, torch.rand(B * R, N, generator=g)
    if name == "decode_score":
        return tokens, x
    raise ValueError(f"unknown graph {name!r}; expected one of {GRAPHS}")


def export_onnx(name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...], path: str | Path) -> None:
    """Export one graph module with static shapes to `path` (written atomically) and check it."""
    names_in, names_out = IO_NAMES[name]
    with _quiet():
        program = torch.onnx.export(module.eval(), inputs, input_names=names_in, output_names=names_out,
                                    opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
    model = program.model_proto
    onnx.checker.check_model(model, full_check=True)     # full_check: shape inference must succeed too
    buf = io.BytesIO()
    onnx.save(model, buf)
    write_atomic(path, buf.getvalue())


def fp32_nodes(name: str, model: onnx.ModelProto) -> list[str]:
    """Nodes of graph `name` computed in fp32 in its fp16 copy, beyond the op types `to_fp16` always keeps
    in fp32 (LayerNorm, softmax, CumSum, reductions, comparisons):

    encode:        everything after the convolutional encoder: the layout of z, |e|^2, z @ e^T, the distance
                   and ArgMin. A nearest-code search in fp16 would flip tokens whose two nearest codes are
                   close. (Found as the nodes that are not the last Conv or one of its ancestors: with small
                   codebooks the exporter folds |e|^2 and e^T into constants, so names cannot be relied on.)
    decode_score:  every node that depends on the input slice x: the residual |restoration - x|, the
                   min/avg pooling, the brain mask and the mean over R. x stays exact and the small residuals
                   are not rounded to fp16's 2^-11 relative step before smoothing.
    atd, mvtm_step: none; the transformer's MatMuls are where fp16 pays.
    """
    nodes = list(model.graph.node)
    if name == "encode":
        last_conv = [n for n in nodes if n.op_type == "Conv"][-1]                 # nodes are in topological order
        encoder = set(_ancestors(model, last_conv))
        return [n.name for n in nodes if n.name not in encoder]
    if name == "decode_score":
        return downstream_nodes(model, [n.name for n in nodes if "x" in n.input])
    return []


def _ancestors(model: onnx.ModelProto, node: onnx.NodeProto) -> list[str]:
    """Names of `node` and of every node it depends on (top graph)."""
    producer = {out: n for n in model.graph.node for out in n.output}
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.name not in seen:
            seen.add(n.name)
            todo.extend(producer[i] for i in n.input if i in producer)
    return sorted(seen)


def export_fp16(name: str, src: str | Path, dst: str | Path) -> dict:
    """Write the half-precision copy of graph `name` (same inputs, outputs and dtypes); returns the
    converter's report (`mimood.export.fp16.to_fp16`)."""
    import modelopt.onnx.autocast  # noqa: F401  (sets up the log handler that _quiet filters)

    with _quiet():
        return to_fp16(src, dst, keep_fp32_nodes=fp32_nodes(name, onnx.load(str(src))))


@contextmanager
def _quiet():
    """Hide the converters' known, harmless warnings (the exporter: "torchvision is not installed", a
    pytree FutureWarning; ModelOpt: "shared constants were duplicated", which its handler prints to
    stdout, into the CLI's output). Errors still show."""
    torch_log = logging.getLogger("torch.onnx")
    handlers = logging.getLogger("modelopt.onnx").handlers
    level = torch_log.level
    drop = lambda record: record.levelno >= logging.ERROR  # noqa: E731
    torch_log.setLevel(logging.ERROR)
    for h in handlers:
        h.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        torch_log.setLevel(level)
        for h in handlers:
            h.removeFilter(drop)
