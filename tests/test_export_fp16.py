"""fp16 conversion (ModelOpt AutoCast) and the validation helpers, on small real torch graphs.

Graphs are exported with `torch.onnx.export(..., dynamo=True)`: with torch 2.13 the TorchScript
exporter (dynamo=False) still works but warns that it will be removed, and the dynamo exporter
is what `mimood.export.graphs` uses. Tolerances: fp16 has a 2^-11 relative step, so softmax
probabilities after an fp16 Linear agree to ~1e-3; we allow 2e-3 absolute.
"""
import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from mimood.contract import graph_io
from mimood.errors import InputError
from mimood.export.fp16 import downstream_nodes, node_precisions, to_fp16
from mimood.export.validate import compare, run_onnx

K, D, B, N = 16, 32, 4, 50


class Sampler(nn.Module):
    """Token embedding -> LayerNorm -> Linear -> softmax -> inverse-CDF sample (CumSum < u):
    the shape of the MVTM step graph."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln, self.fc = nn.Embedding(K + 1, D), nn.LayerNorm(D), nn.Linear(D, K)

    def forward(self, tokens, u):                     # [B, N] int32, [B, N, 1] float32
        p = torch.softmax(self.fc(self.ln(self.emb(tokens.long()))), -1)  # [B, N, K]
        ids = (torch.cumsum(p, -1) < u).sum(-1).clamp(max=K - 1)          # [B, N]
        return p, ids.to(torch.int32)


class ConvScore(nn.Module):
    """Conv encoder/decoder, then |restoration - input| with min- and average pooling: the
    shape of the decoder+score graph."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1))
        self.dec = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Sigmoid())

    def forward(self, x):                             # [B, 1, H, W]
        r = self.dec(self.enc(x))                     # [B, 1, H, W]
        res = (r - x).abs()
        res = -nn.functional.max_pool2d(-res, 3, 1, 1)  # min pool
        return r, nn.functional.avg_pool2d(res, 7, 1, 3)


def _export(module, args, names_in, names_out, path):
    torch.onnx.export(module.eval(), args, str(path), input_names=names_in, output_names=names_out,
                      dynamo=True, external_data=False, verbose=False)
    return path


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    torch.manual_seed(0)
    m = Sampler()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, K + 1, (B, N), generator=g, dtype=torch.int32)
    u = torch.rand(B, N, 1, generator=g)
    path = _export(m, (tokens, u), ["tokens", "u"], ["probs", "ids"],
                   tmp_path_factory.mktemp("sampler") / "sampler.onnx")
    with torch.no_grad():
        want = [t.numpy() for t in m(tokens, u)]
    return path, {"tokens": tokens.numpy(), "u": u.numpy()}, want


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    torch.manual_seed(0)
    m = ConvScore()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    path = _export(m, (x,), ["x"], ["restoration", "score"],
                   tmp_path_factory.mktemp("conv") / "conv.onnx")
    with torch.no_grad():
        want = [t.numpy() for t in m(x)]
    return path, {"x": x.numpy()}, want


def _initializer_types(model, op_type):
    """Data types of the initializers read by nodes of `op_type`."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return {inits[t] for n in model.graph.node if n.op_type == op_type for t in n.input if t in inits}


def test_sampler_fp16_keeps_norm_softmax_sampling_and_int_io(sampler, tmp_path):
    src, feeds, (want_p, want_ids) = sampler
    dst = tmp_path / "sampler_fp16.onnx"
    report = to_fp16(src, dst)
    m16 = onnx.load(str(dst))

    assert _initializer_types(m16, "MatMul") == {onnx.TensorProto.FLOAT16}
    assert _initializer_types(m16, "Gather") == {onnx.TensorProto.FLOAT16}   # embedding table
    assert _initializer_types(m16, "LayerNormalization") == {onnx.TensorProto.FLOAT}
    prec = node_precisions(m16)
    by_op = {n.op_type: prec.get(n.name) for n in m16.graph.node}
    assert by_op["MatMul"] == "fp16"
    assert by_op["LayerNormalization"] == by_op["Softmax"] == by_op["CumSum"] == "fp32"
    assert by_op["Less"] == "fp32"                    # cdf < u compared in fp32
    assert report["nodes_fp16"] >= 2 and "converter" in report
    assert report["io"] == {"tokens": "int32", "u": "float32", "probs": "float32", "ids": "int32"}
    assert graph_io(dst) == graph_io(src)             # same names, shapes and dtypes outside

    got = run_onnx(dst, feeds)
    assert got["ids"].dtype == np.int32
    p = compare("probs", got["probs"], want_p, atol=2e-3)
    ids = compare("ids", got["ids"], want_ids, atol=0, max_mismatch_share=0.02)
    assert p.passed and ids.passed, (str(p), str(ids))
    assert 0 < p.max_abs_err < 2e-3                   # it is really fp16 inside, and close
    assert compare("probs32", run_onnx(src, feeds)["probs"], want_p, atol=1e-5).passed


def test_conv_fp16_keeps_residual_and_pooling_after_named_node(conv, tmp_path):
    src, feeds, (want_r, want_s) = conv
    model = onnx.load(str(src))
    sub = next(n.name for n in model.graph.node if n.op_type == "Sub")
    after = downstream_nodes(model, [sub])
    assert [model.graph.node[i].op_type for i in range(len(model.graph.node))
            if model.graph.node[i].name in after][-1] == "AveragePool"

    dst = tmp_path / "conv_fp16.onnx"
    report = to_fp16(src, dst, keep_fp32_after=[sub])
    m16 = onnx.load(str(dst))
    assert _initializer_types(m16, "Conv") == {onnx.TensorProto.FLOAT16}
    assert _initializer_types(m16, "ConvTranspose") == {onnx.TensorProto.FLOAT16}
    prec = node_precisions(m16)
    for n in m16.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Relu"):
            assert prec[n.name] == "fp16", n.name
        if n.op_type in ("Sub", "Abs", "Neg", "MaxPool", "AveragePool"):
            assert prec[n.name] == "fp32", n.name
    assert set(report["nodes_fp32"]) == set(after)
    # the residual reads the fp32 graph input itself, not an fp16 copy of it
    sub16 = next(n for n in m16.graph.node if n.op_type == "Sub")
    assert "x" in sub16.input

    got = run_onnx(dst, feeds)
    checks = [compare("restoration", got["restoration"], want_r, atol=2e-3),
              compare("score", got["score"], want_s, atol=2e-3)]
    assert all(c.passed for c in checks), [str(c) for c in checks]


def test_keep_named_node_fp32_and_unknown_names(sampler, tmp_path):
    src, feeds, _ = sampler
    matmul = next(n.name for n in onnx.load(str(src)).graph.node if n.op_type == "MatMul")
    dst = tmp_path / "s.onnx"
    report = to_fp16(src, dst, keep_fp32_nodes=[matmul])
    m16 = onnx.load(str(dst))
    assert _initializer_types(m16, "MatMul") == {onnx.TensorProto.FLOAT}
    assert matmul in report["nodes_fp32"]
    with pytest.raises(ValueError, match="no_such_node"):
        to_fp16(src, tmp_path / "x.onnx", keep_fp32_after=["no_such_node"])


def test_compare_rules():
    want = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    assert compare("a", want + 1e-4, want, atol=1e-3).passed
    c = compare("a", want + [0, 0, 0, 0.1], want, atol=1e-3)
    assert not c.passed and c.mismatch_share == 0.25 and abs(c.max_abs_err - 0.1) < 1e-6
    assert "FAIL a" in str(c)
    assert compare("a", want + [0, 0, 0, 0.1], want, atol=1e-3, max_mismatch_share=0.25).passed
    assert compare("r", want * 1.01, want, atol=0, rtol=0.02).passed
    assert not compare("nan", np.array([np.nan, 2, 3, 4], np.float32), want, atol=1).passed
    ids = np.array([1, 2, 3, 4], np.int32)
    assert compare("i", ids, ids.astype(np.int64), atol=0).passed
    assert compare("i", ids + [0, 0, 0, 1], ids, atol=0).mismatch_share == 0.25
    assert not compare("shape", want[:3], want, atol=1).passed
    k = compare("kind", ids, want, atol=10)
    assert not k.passed and "dtype" in k.problem


def test_run_onnx_and_graph_io_bad_paths(tmp_path):
    with pytest.raises(InputError, match="not found"):
        run_onnx(tmp_path / "missing.onnx", {})
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00 definitely not a protobuf graph \xff" * 10)
    with pytest.raises(InputError, match="bad.onnx"):
        run_onnx(bad, {})
    with pytest.raises(InputError, match="bad.onnx"):
        graph_io(bad)
