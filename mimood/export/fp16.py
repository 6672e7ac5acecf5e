"""Half-precision ONNX graphs with the sensitive parts kept in fp32 (`mimood-export --fp16`).

TensorRT 10 with STRONGLY_TYPED and TensorRT 11 (always strongly typed) take every tensor's type
from the graph: there is no fp16 builder flag, so precision is decided here, once, and the same
file is validated in onnxruntime on the CPU and built into an engine on the GPU.

Converter: NVIDIA ModelOpt AutoCast, `modelopt.onnx.autocast.convert_to_mixed_precision`, the
tool NVIDIA documents for making such graphs for TensorRT. What we observed (nvidia-modelopt
0.47, a CPU-only machine without TensorRT or CUDA):
- It converts on the CPU. With `data_max=inf` it runs no reference inference (no polygraphy, no
  random inputs), so the fp32 set is deterministic: the op types and node names we pass, plus
  initializers outside the fp16 range (`init_max`, its default 65504). Its graphs are clean:
  one Cast per precision change, topologically sorted, LayerNorm weights left fp32, int tensors
  untouched.
- Its `[onnx]` extra cannot sit beside the CPU onnxruntime: on Linux x86-64 it pulls
  onnxruntime-gpu (which replaces the `onnxruntime` module), cupy-cuda12x and onnx~=1.21
  (about 700 MB). The base package plus onnx-graphsurgeon, onnxslim and lief (which
  `modelopt.onnx` imports at import time) is enough for AutoCast; pyproject lists those.
- The maintained alternatives failed on the LayerNorm + Linear + Softmax + CumSum test graph:
  onnxconverter-common 1.16 `convert_float_to_float16(keep_io_types=True, op_block_list=...)`
  made an invalid graph (an fp32 graph output that also feeds a blocked CumSum became fp16);
  onnxruntime.transformers.float16 made a valid but lossy one (fp32 -> fp16 -> fp32 round trips
  between blocked nodes and on kept-fp32 inputs such as the uniform sample of inverse-CDF
  sampling) whose nodes were not in topological order, as ONNX requires (onnx.checker rejects it).
So there is no fallback converter; ModelOpt is imported inside `to_fp16` only because its import
takes seconds.

Validation caveat: onnxruntime's CPU provider runs fp16 ops it has no fp16 kernel for in fp32
(it inserts casts), so a CPU check covers the graph and fp16 rounding at op boundaries, not every
fp16 accumulation; engines built from the graph are checked again on the GPU.
"""
from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

from mimood.contract import atomic_write

# Ops computed in fp32: normalisation and softmax (the list), reductions, the CumSum /
# ArgMax / TopK that turn probabilities into tokens, and comparisons (sampling `cdf < u`, the
# ATD threshold `p < lambda`): all cheap, and fp16 rounding there changes which token is chosen.
KEEP_FP32_OPS = (
    "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "Softmax", "LogSoftmax", "CumSum", "ArgMax", "ArgMin", "TopK",
    "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceSumSquare", "ReduceLogSumExp",
    "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal",
)
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def downstream_nodes(model: onnx.ModelProto, start: Sequence[str]) -> list[str]:
    """Names of the nodes `start` and of every node that depends on their outputs (top graph)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_name = {n.name: n for n in model.graph.node}
    seen, todo = set(), [by_name[s] for s in start]
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        todo.extend(c for out in node.output for c in consumers.get(out, ()))
    return [n.name for n in model.graph.node if n.name in seen]


def node_precisions(model: onnx.ModelProto) -> dict[str, str]:
    """"fp16" or "fp32" for every non-Cast node that reads or writes a float tensor: fp16 when any
    of its float inputs or outputs is fp16."""
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    out = {}
    for node in g.node:
        if node.op_type == "Cast":
            continue
        floats = [types[t] for t in [*node.input, *node.output] if types.get(t) in _FLOATS]
        if floats:
            out[node.name] = "fp16" if onnx.TensorProto.FLOAT16 in floats else "fp32"
    return out


def _io_dtypes(model: onnx.ModelProto) -> dict[str, str]:
    g = model.graph
    inits = {i.name for i in g.initializer}
    return {v.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name
            for v in [*g.input, *g.output] if v.name not in inits}


def to_fp16(src: str | Path, dst: str | Path, keep_fp32_ops: Sequence[str] = KEEP_FP32_OPS,
            keep_fp32_nodes: Sequence[str] = (), keep_fp32_after: Sequence[str] = (),
            keep_io_types: bool = True) -> dict:
    """Write a mixed fp16/fp32 copy of the graph `src` to `dst` and report what was converted.

    keep_fp32_ops: op types computed in fp32.
    keep_fp32_nodes: node names computed in fp32.
    keep_fp32_after: node names that, with every node depending on them, stay fp32 (e.g. the
        residual |restoration - input| and its pooling after the decoder).
    keep_io_types: float graph inputs/outputs stay fp32 (casts inside); integer tensors are never
        touched either way.
    """
    from modelopt.onnx.autocast import convert_to_mixed_precision

    for name in ("modelopt.onnx", "modelopt.onnx.autocast"):  # they log every node at INFO
        logging.getLogger(name).setLevel(logging.WARNING)

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    for i, node in enumerate(model.graph.node):  # AutoCast selects nodes by name: name them all
        node.name = node.name or f"{node.op_type}_{i}"
    names = {n.name for n in model.graph.node}
    unknown = sorted(set(keep_fp32_nodes) - names) + sorted(set(keep_fp32_after) - names)
    if unknown:
        raise ValueError(f"{src}: no nodes named {unknown}")
    fp32_nodes = sorted(set(keep_fp32_nodes) | set(downstream_nodes(model, keep_fp32_after)))

    with tempfile.TemporaryDirectory() as tmp:  # AutoCast reads a path; give it the named copy
        named = Path(tmp) / src.name
        onnx.save(model, str(named))
        out = convert_to_mixed_precision(
            onnx_path=str(named), low_precision_type="fp16", keep_io_types=keep_io_types,
            op_types_to_exclude=list(keep_fp32_ops),
            nodes_to_exclude=[f"^{re.escape(n)}$" for n in fp32_nodes],
            data_max=np.inf)  # inf: classify by op type and name only, run no reference inference
    onnx.checker.check_model(out)
    with atomic_write(dst) as tmp:
        tmp.write_bytes(out.SerializeToString())

    precisions = node_precisions(out)
    inits = [i.data_type for i in out.graph.initializer]
    return {
        "converter": f"modelopt.onnx.autocast {metadata.version('nvidia-modelopt')}",
        "nodes_fp16": sum(p == "fp16" for p in precisions.values()),
        "nodes_fp32": sorted(n for n, p in precisions.items() if p == "fp32"),
        "casts_added": (sum(n.op_type == "Cast" for n in out.graph.node)
                        - sum(n.op_type == "Cast" for n in model.graph.node)),
        "initializers_fp16": inits.count(onnx.TensorProto.FLOAT16),
        "initializers_fp32": inits.count(onnx.TensorProto.FLOAT),
        "io": _io_dtypes(out),
    }
