"""TensorRT engine cache: the key, the sidecar checks, and (on a GPU with TensorRT) a real build.

The cache logic is pure Python and runs everywhere, on fake engine bytes; the build-and-run
test is skipped unless `tensorrt` imports and torch sees a CUDA GPU.
"""
import json
import logging
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from mimood.runtime import trt as T

FIELDS = dict(precision="fp16", trt_version="11.4.0", compute_capability="9.0")


@pytest.fixture
def graph(tmp_path):
    p = tmp_path / "atd.onnx"
    p.write_bytes(b"pretend onnx bytes v1")
    return p


def test_module_imports_without_tensorrt():
    code = "import sys, mimood.runtime.trt; assert 'tensorrt' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_key_changes_with_every_field_and_the_onnx_bytes(graph):
    key = T.engine_key(graph, **FIELDS)
    assert len(key) == 64 and key == T.engine_key(graph, **FIELDS)
    for name, other in [("precision", "fp32"), ("trt_version", "10.13.0"),
                        ("compute_capability", "8.9")]:
        assert T.engine_key(graph, **{**FIELDS, name: other}) != key, name
    graph.write_bytes(b"pretend onnx bytes v2")
    assert T.engine_key(graph, **FIELDS) != key
    assert T.engine_path(graph, key) == graph.parent / f"atd.{key[:12]}.engine"


def test_find_engine_accepts_only_a_matching_sidecar(graph, caplog):
    assert T.find_engine(graph, **FIELDS) is None
    path = T.save_engine(graph, FIELDS["precision"], FIELDS["trt_version"],
                         FIELDS["compute_capability"], b"ENGINE")
    sidecar = path.with_name(path.name + ".json")
    meta = json.loads(sidecar.read_text())
    assert path == T.engine_path(graph, T.engine_key(graph, **FIELDS))
    assert meta["onnx_file"] == "atd.onnx" and meta["tensorrt"] == "11.4.0"
    assert T.find_engine(graph, **FIELDS) == path

    # engines for another TensorRT, GPU or precision are skipped but kept for their machine
    with caplog.at_level(logging.INFO, logger="mimood.runtime.trt"):
        for name, other in [("trt_version", "10.13.0"), ("compute_capability", "8.9"),
                            ("precision", "fp32")]:
            assert T.find_engine(graph, **{**FIELDS, name: other}) is None, name
    assert path.exists() and "another TensorRT, GPU or precision" in caplog.text
    assert T.find_engine(graph, **FIELDS) == path

    # the graph changed: the engine can never be valid again and is deleted
    graph.write_bytes(b"pretend onnx bytes v2")
    with caplog.at_level(logging.WARNING, logger="mimood.runtime.trt"):
        assert T.find_engine(graph, **FIELDS) is None
    assert not path.exists() and not sidecar.exists()
    assert "atd.onnx changed" in caplog.text


@pytest.mark.parametrize("damage, why", [
    ("sidecar_field", "does not match its name"),    # e.g. a sidecar edited to claim another GPU
    ("engine_bytes", "bytes differ"),                # engine replaced or truncated
    ("no_sidecar", "missing or unreadable"),
    ("bad_json", "missing or unreadable"),
])
def test_find_engine_deletes_inconsistent_engines(graph, caplog, damage, why):
    path = T.save_engine(graph, FIELDS["precision"], FIELDS["trt_version"],
                         FIELDS["compute_capability"], b"ENGINE")
    sidecar = path.with_name(path.name + ".json")
    if damage == "sidecar_field":
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "tensorrt": "11.9.9"}))
    elif damage == "engine_bytes":
        path.write_bytes(b"ENGIN")
    elif damage == "no_sidecar":
        sidecar.unlink()
    else:
        sidecar.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="mimood.runtime.trt"):
        assert T.find_engine(graph, **FIELDS) is None
    assert why in caplog.text and not path.exists() and not sidecar.exists()


def test_find_engine_ignores_other_graphs_with_a_similar_name(graph):
    other = graph.with_name("atd.fp16.onnx")
    other.write_bytes(b"another graph")
    theirs = T.save_engine(other, **{**FIELDS, "engine_bytes": b"X"})
    assert theirs.name.startswith("atd.fp16.")
    assert T.find_engine(graph, **FIELDS) is None
    assert theirs.exists() and T.find_engine(other, **FIELDS) == theirs


def test_trt_available_says_why():
    ok, reason = T.trt_available()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert (ok, reason) == (False, "tensorrt not installed")
        return
    if not torch.cuda.is_available():
        assert (ok, reason) == (False, "no CUDA GPU")
    else:
        assert ok and reason.startswith("tensorrt ")


@pytest.mark.trt
def test_build_and_run_engine(tmp_path):
    """Build a strongly typed fp16 engine from a tiny MatMul+Softmax graph, run it on named
    device buffers and compare with numpy; a second lookup hits the cache."""
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["x16", "w"], ["y16"]),
             helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT),
             helper.make_node("Softmax", ["y"], ["p"], axis=-1)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, [2, 4])],
                          [onnx.numpy_helper.from_array(w.astype(np.float16), "w")])
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    cache = tmp_path / "timing.cache"
    engine = T.ensure_engine(path, "fp16", cache)
    assert cache.stat().st_size > 0 and T.find_engine(path, "fp16") == engine
    sess = T.TrtSession(engine)
    assert sess.inputs == ["x"] and sess.outputs == ["p"]
    x = rng.standard_normal((2, 8)).astype(np.float32)
    got = sess.run({"x": torch.from_numpy(x).cuda()})["p"]
    torch.cuda.synchronize()
    logits = x.astype(np.float16).astype(np.float32) @ w.astype(np.float16).astype(np.float32)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(got.cpu().numpy(), want, atol=3e-3)
    assert T.ensure_engine(path, "fp16", cache) == engine
