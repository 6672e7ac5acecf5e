"""The onnxruntime-only copies of the transformer graphs (`mimood.export.graphs.export_ort`): what the rewrites
did to the graph, that the copies compute what PyTorch and the standard graphs compute, how the manifest
records them, and that the standard graphs stay plain ONNX at opset 20 (what TensorRT parses).

The run is `make_random_run`'s (random tiny-preset models, real slices) with every ATD and MVTM parameter
(but the ATD's head, set to put some tokens above lambda) moved off its initial value: freshly initialised
Linear biases are zero and LayerNorms are the identity, so a bias taken from the wrong slice of the qkv
projection would go unnoticed.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnxscript import ir

from mimood.config import preset
from mimood.contract import file_sha256
from mimood.export import export as ex
from mimood.export.graphs import _COUNT_IN_FLOAT, OPSET, ORT_GRAPHS, build_modules
from mimood.models.checkpoint import load_model
from test_export_graphs import make_perturbed_run

B = 4
DEPTH = preset("tiny").transformer.depth


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = make_perturbed_run(tmp_path_factory.mktemp("ort") / "run")
    manifest = ex.export_run(run, batch=B, progress=False)
    return run, run / "export", manifest


def test_manifest_records_the_ort_copies_beside_the_graphs(exported):
    _, out, m = exported
    assert sorted(m.graphs) == ["atd", "decode_score", "encode", "mvtm_step"]   # every backend reads these
    assert sorted(m.extra.ort_graphs) == sorted(ORT_GRAPHS)
    for name, g in m.extra.ort_graphs.items():
        assert (g.file, g.source, g.precision) == (f"{name}.ort.onnx", f"{name}.onnx", "fp32")
        assert g.sha256 == file_sha256(out / g.file)
        rows = lambda io: {k: [["rows", *shape[1:]], dtype] for k, (shape, dtype) in io.items()}  # noqa: E731
        assert (g.inputs, g.outputs) == (rows(m.graphs[name]["inputs"]), rows(m.graphs[name]["outputs"]))
        assert g.rewrites == {"attention": DEPTH, "multi_head_attention": DEPTH, "split_qkv": 3 * DEPTH,
                                 "qkv_bias_in_attention": DEPTH, "count_in_float": int(name == "mvtm_step")}
        checks = m.validation[f"{name}.ort"]
        assert checks and all(c["passed"] for c in checks), checks


def _ops(path):
    return [(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node]


def test_ort_copies_use_fused_attention_and_standard_graphs_stay_standard(exported):
    _, out, m = exported
    for name in ORT_GRAPHS:
        model = onnx.load(str(out / f"{name}.ort.onnx"))
        ops = [(n.domain, n.op_type) for n in model.graph.node]
        mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
        assert len(mha) == DEPTH and all(n.domain == "com.microsoft" for n in mha)
        assert all(len(n.input) == 4 and n.input[3] for n in mha)                 # q, k, v and their bias
        assert ("", "Transpose") not in ops and ("", "Split") not in ops
        assert ops.count(("", "Softmax")) == (1 if name == "mvtm_step" else 0)    # only the sampling softmax
        assert ("", "Attention") not in ops
    mvtm = onnx.shape_inference.infer_shapes(onnx.load(str(out / "mvtm_step.ort.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in mvtm.graph.value_info}
    (reduce,) = [n for n in mvtm.graph.node if n.op_type == "ReduceSum"]
    assert types[reduce.input[0]] == TensorProto.FLOAT                            # the count of cdf < u
    for name in m.graphs:                                                          # TensorRT's side
        model = onnx.load(str(out / m.graphs[name]["file"]))
        assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
        assert {d for d, _ in _ops(out / m.graphs[name]["file"])} == {""}


def test_ort_copies_match_pytorch_and_the_standard_graphs_on_other_slices(exported):
    run, out, m = exported
    models = [load_model(run / k / "best.safetensors")[0] for k in ("vqvae", "atd", "mvtm")]
    modules = build_modules(*models, preset("tiny").restore, m.R)
    s = np.load(run / "data" / "val_slices.npz")["images"]
    x = torch.from_numpy(s[[35, 65, 95, 125]].astype(np.float32))[:, None]
    feeds, want = ex.reference_io(modules, x, m.R, m.lam)
    assert 0.1 < feeds["mvtm_step"]["mask"].mean() < 0.9
    for name in ORT_GRAPHS:
        path = out / f"{name}.ort.onnx"
        checks = ex.check_graph(name, path, feeds[name], want[name], ex.TOLERANCES["fp32"], m.lam)
        assert all(c.passed and c.mismatch_share == 0 and c.max_abs_err < 1e-5 for c in checks), \
            [str(c) for c in checks]
        fused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        plain = ort.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        got, ref = fused.run(None, feeds[name])[0], plain.run(None, feeds[name])[0]
        if name == "atd":
            np.testing.assert_allclose(got, ref, atol=1e-6)
            assert got.std() > 1e-3                                                # not a constant output
        else:
            np.testing.assert_array_equal(got, ref)
            mask = feeds[name]["mask"]
            assert (got[mask] != feeds[name]["tokens"][mask]).mean() > 0.5        # masked tokens were redrawn


def _count_model(shape):
    """count = ReduceSum(Cast(x > 0.5 -> int64), axis -1): the pattern `_CountInFloat` rewrites."""
    nodes = [helper.make_node("Greater", ["x", "half"], ["b"]),
             helper.make_node("Cast", ["b"], ["i"], to=TensorProto.INT64),
             helper.make_node("ReduceSum", ["i", "axes"], ["count"], keepdims=0)]
    graph = helper.make_graph(nodes, "count", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("count", TensorProto.INT64, shape[:-1])],
                              [helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
                               helper.make_tensor("axes", TensorProto.INT64, [1], [-1])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))
    ir.passes.common.ShapeInferencePass()(model)
    return model


def test_count_in_float_is_exact_and_only_where_float32_counts_exactly():
    model = _count_model([3, 300])
    assert _COUNT_IN_FLOAT.apply_to_model(model) == 1
    proto = ir.to_proto(model)
    assert [n.op_type for n in proto.graph.node] == ["Greater", "Cast", "ReduceSum", "Cast"]
    x = np.random.default_rng(0).random((3, 300)).astype(np.float32)
    x[1] = 1.0                                                                     # all 300 counted
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    count = sess.run(None, {"x": x})[0]
    assert count.dtype == np.int64
    np.testing.assert_array_equal(count, (x > 0.5).sum(-1))
    assert count[1] == 300

    assert _COUNT_IN_FLOAT.apply_to_model(_count_model([1, 2 ** 24])) == 0      # 2^24 + 1 is not a float32
