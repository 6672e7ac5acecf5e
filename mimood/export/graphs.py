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
At opset 23 the exporter writes `F.scaled_dot_product_attention` as the standard `Attention` op, but
onnxruntime 1.32's CPU kernel for it is no faster than MatMul/Softmax/MatMul (measured with
`benchmarks/ort_attention.py`) and TensorRT parses `Attention` only from 10.14 on: the standard graphs stay
at 20.

onnxruntime-only copies of the transformer graphs (`export_ort`):

    atd.ort.onnx, mvtm_step.ort.onnx    the same function, inputs and outputs as atd.onnx / mvtm_step.onnx
                                        (sums in another order; validated against PyTorch like them), but
                                        with a symbolic row dimension (`rows`): any number of rows

The copies are exported again from the modules with torch.export's dynamic dimension for the rows (each row of
these two steps depends on its own row only), so the onnxruntime engine can run only the rows that can still
change: not the padding rows of a volume's last batch, not the rows whose mask came back empty (they never
change again), and each set of identical rows once (the R copies of a slice before the first step).

The standard graphs keep attention as MatMul + Softmax + MatMul on [BR, heads, 400, 400] (a 328 MB tensor
per layer at B*R = 128), which onnxruntime's own optimizer does not fuse. These copies use onnxruntime's
contrib `com.microsoft.MultiHeadAttention`, whose CPU kernel is a flash-attention loop over L2-sized blocks,
fed by separate q/k/v projections (no [3, B, heads, N, c] transpose or split) with their bias added inside
the kernel; mvtm_step also counts `cdf < u` in float32 rather than int64 (exact: at most K ones). Contrib
ops are not standard ONNX: TensorRT cannot parse these files, and they are meant for onnxruntime's CPU
provider only. Measured with the cpu preset's trained models (B*R = 128, 2 cores): ~1.6x faster than torch
eager per call, where the standard graphs are ~1.25-1.35x, and the whole loop 1.5x (1.2x).
"""
from __future__ import annotations

import io
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxscript import ir, optimizer
from onnxscript.ir.passes.common import LiftConstantsToInitializersPass, ShapeInferencePass
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha
from torch import nn

from mimood.config import GRID, IMAGE_SIZE, RestoreConfig
from mimood.contract import GRAPHS, IO_NAMES, ROW_GRAPHS, ROWS, atomic_write  # names and I/O: the contract's
from mimood.export.fp16 import downstream_nodes, to_fp16
from mimood.models.graphs import ATDGraph, DecodeScore, EncodeGraph, MVTMStep

OPSET = 20
N = GRID * GRID
ORT_GRAPHS = ROW_GRAPHS              # those with an onnxruntime-only copy (export_ort), rows symbolic


def build_modules(vqvae: nn.Module, atd: nn.Module, mvtm: nn.Module, cfg: RestoreConfig, R: int
                  ) -> dict[str, nn.Module]:
    """The four graph modules (eval mode, CPU) for R restorations."""
    modules = {"encode": EncodeGraph(vqvae), "atd": ATDGraph(atd),
               "mvtm_step": MVTMStep(mvtm, cfg.temperature),
               "decode_score": DecodeScore(vqvae, R, cfg.min_pool, cfg.avg_pool, cfg.residual)}
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


def export_onnx(name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...], path: str | Path,
                rows: bool = False) -> None:
    """Export one graph module with static shapes to `path` (written atomically) and check it. rows=True (the
    row-wise steps only, for their onnxruntime-only copies): the first dimension of every input and output is
    the symbol ROWS (torch.export's dynamic dimension), so the graph runs any number of rows."""
    names_in, names_out = IO_NAMES[name]
    dynamic = None
    if rows:
        if name not in ROW_GRAPHS:
            raise ValueError(f"{name} is not row-wise; only {ROW_GRAPHS} take any number of rows")
        dim = torch.export.Dim(ROWS)
        dynamic = tuple({0: dim} for _ in inputs)
    with _quiet():
        program = torch.onnx.export(module.eval(), inputs, input_names=names_in, output_names=names_out,
                                    opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
                                    dynamic_shapes=dynamic)
    model = program.model_proto
    onnx.checker.check_model(model, full_check=True)     # full_check: shape inference must succeed too
    buf = io.BytesIO()
    onnx.save(model, buf)
    with atomic_write(path) as tmp:
        tmp.write_bytes(buf.getvalue())


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


def export_ort(src: str | Path, dst: str | Path) -> dict[str, int]:
    """Write the onnxruntime-only copy of a transformer graph (atd.onnx or mvtm_step.onnx; see the module
    docstring) and return how many times each rewrite applied. A rewrite that finds nothing leaves that part
    as it is, so the copy is always correct; the counts (recorded in the manifest) show what was fused.

    The attention fusion is onnxscript's (`ort_fusions`: the exporter's MatMul/Softmax/MatMul -> an SDPA
    pattern -> MultiHeadAttention, and the q/k/v bias into MultiHeadAttention); the two rules between are
    ours because onnxscript has none for a fused qkv Linear viewed as [B, N, 3, heads, c]."""
    model = ir.load(str(src))
    ShapeInferencePass()(model)
    optimizer.optimize(model)
    counts = {"attention": fuse_sdpa(model, apply_shape_inference=True),
              "multi_head_attention": replace_sdpa_by_mha(model),
              "split_qkv": _SPLIT_QKV.apply_to_model(model)}
    ShapeInferencePass()(model)                                   # shapes of the new q/k/v for fuse_mha_bias
    counts["qkv_bias_in_attention"] = fuse_mha_bias(model)
    counts["count_in_float"] = _COUNT_IN_FLOAT.apply_to_model(model)
    optimizer.optimize(model)                                     # folds the bias Concat, drops dead nodes
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    buf = io.BytesIO()
    onnx.save(proto, buf)
    with atomic_write(dst) as tmp:
        tmp.write_bytes(buf.getvalue())
    return counts


def _const_ints(value: ir.Value | None) -> list[int] | None:
    t = None if value is None else ir.convenience.get_const_tensor(value)
    return None if t is None else t.numpy().reshape(-1).tolist()


class _SplitQKV(pattern.RewriteRuleClassBase):
    """One of q, k, v cut out of the fused projection, `Linear(C, 3C)(x).view(B, N, 3, h, c).permute(2, 0, 3,
    1, 4)[j]`, as MultiHeadAttention takes it ([B, N, h*c], after onnxscript's SDPA -> MHA rewrite):
    -> `x @ W[:, jC:(j+1)C] + b[jC:(j+1)C]`, its own projection: the same dot products, without writing the
    [3, B, h, N, c] transpose and reading it back three times."""

    def __init__(self):
        super().__init__(remove_nodes=False)   # the fused projection feeds all three; dropped once unused

    def pattern(self, op, x, w, b, shape5, start, end, axes, squeeze_axes, shape3):
        qkv = op.Reshape(op.Add(op.MatMul(x, w), b), shape5, _allow_other_attributes=True)   # [B, N, 3, h, c]
        one = op.Squeeze(op.Slice(op.Transpose(qkv, perm=[2, 0, 3, 1, 4]), start, end, axes), squeeze_axes)
        return op.Reshape(op.Transpose(one, perm=[0, 2, 1, 3]), shape3, _allow_other_attributes=True)

    def check(self, context, w, b, shape5, start, end, axes, squeeze_axes, shape3, **_):
        result = pattern.MatchResult()
        if w.const_value is None or b.const_value is None or len(w.const_value.shape) != 2:
            return result.fail("the projection's weights are not constants")
        shape, j = _const_ints(shape5), _const_ints(start)
        if shape is None or len(shape) != 5 or shape[2] != 3 or 3 * shape[3] * shape[4] != w.const_value.shape[1]:
            return result.fail("not a [B, N, 3, heads, c] view of the projection")
        if (j is None or len(j) != 1 or _const_ints(end) != [j[0] + 1] or _const_ints(axes) not in ([0], [-5])
                or _const_ints(squeeze_axes) not in ([0], [-4]) or _const_ints(shape3) != [0, 0, -1]):
            return result.fail("not one of q, k, v as [B, N, heads * c]")
        return result

    def rewrite(self, op, x, w, b, start, **_):
        j = _const_ints(start)[0]
        W, bias = w.const_value.numpy(), b.const_value.numpy()                 # [C, 3C], [3C]
        C = W.shape[1] // 3
        Wj = ir.tensor(np.ascontiguousarray(W[:, j * C:(j + 1) * C]))
        bj = ir.tensor(np.ascontiguousarray(bias[j * C:(j + 1) * C]))
        return op.Add(op.MatMul(x, op.Constant(value=Wj)), op.Constant(value=bj))


class _CountInFloat(pattern.RewriteRuleClassBase):
    """`ReduceSum(Cast(bool -> int64))` -> the same sum of float32 ones, cast to int64: exact while fewer than
    2^24 elements are summed, and half the bytes (mvtm_step's `(cdf < u).sum(-1)` over [BR, N, K])."""

    def pattern(self, op, x, axes):
        return op.ReduceSum(op.Cast(x, to=ir.DataType.INT64), axes, _allow_other_attributes=True,
                            _outputs=["count"])

    def check(self, context, x, axes, count, **_):
        result = pattern.MatchResult()
        dims = _const_ints(axes)
        if x.dtype != ir.DataType.BOOL or dims is None or x.shape is None \
                or not all(isinstance(x.shape[d], int) for d in dims):
            return result.fail("not a count of a bool tensor over axes of known size")
        if np.prod([x.shape[d] for d in dims]) >= 2 ** 24:
            return result.fail("the count may exceed float32's exact integers")
        return result

    def rewrite(self, op, x, axes, count, **_):
        attributes = {k: a.value for k, a in count.producer().attributes.items()}   # keepdims, noop_with_...
        total = op.ReduceSum(op.Cast(x, to=ir.DataType.FLOAT), axes, **attributes)
        return op.Cast(total, to=ir.DataType.INT64)


_SPLIT_QKV = pattern.RewriteRuleSet([_SplitQKV.rule()])
_COUNT_IN_FLOAT = pattern.RewriteRuleSet([_CountInFloat.rule()])


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
            # rows=True gives every input the same dynamic dimension; the exporter says it keeps one name
            warnings.filterwarnings("ignore", ".*The axis name: .* will not be used", UserWarning)
            yield
    finally:
        torch_log.setLevel(level)
        for h in handlers:
            h.removeFilter(drop)
