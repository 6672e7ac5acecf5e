"""manifest.json: round trip, graph records, and `verify` catching changed graph files."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mimood.config import preset
from mimood.contract import FileRecord, Manifest, atomic_write, file_sha256
from mimood.errors import InputError


def _tiny_graph(path):
    """ATD-like signature: int32 tokens [4, 400] -> float32 probabilities [4, 400]."""
    nodes = [helper.make_node("Cast", ["tokens"], ["t"], to=TensorProto.FLOAT),
             helper.make_node("Sigmoid", ["t"], ["p"])]
    g = helper.make_graph(nodes, "atd",
                          [helper.make_tensor_value_info("tokens", TensorProto.INT32, [4, 400])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, [4, 400])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _manifest(tmp_path):
    cfg = preset("tiny")
    m = Manifest.from_config(cfg, threshold=0.125, scan_score="mean_top1pct")
    m.add_graph("atd", _tiny_graph(tmp_path / "atd.onnx"), "fp32")
    m.validation["atd"] = [{"name": "p", "passed": True, "max_abs_err": 1e-6}]
    m.extra.opset = 20
    m.extra.weights["atd"] = FileRecord("weights/atd.safetensors", "0" * 64)
    return m


def test_round_trip_and_fields(tmp_path):
    m = _manifest(tmp_path)
    assert (m.preset, m.batch, m.R, m.T, m.lam) == ("tiny", 4, 2, 2, 0.005)
    assert (m.vocab_size, m.mask_id, m.grid) == (32, 32, 20)
    assert m.data["clip_high"] == 98.0 and m.threshold == 0.125
    assert m.versions["onnx"] == onnx.__version__ and m.created.endswith("+00:00")
    g = m.graphs["atd"]
    assert g["file"] == "atd.onnx" and g["sha256"] == file_sha256(tmp_path / "atd.onnx")
    assert g["inputs"] == {"tokens": [[4, 400], "int32"]}
    assert g["outputs"] == {"p": [[4, 400], "float32"]}

    m.save(tmp_path / "manifest.json")
    text = (tmp_path / "manifest.json").read_text()
    keys = list(json.loads(text))
    assert keys == sorted(keys)
    assert Manifest.load(tmp_path / "manifest.json") == m
    assert Manifest.load(tmp_path) == m               # a folder means its manifest.json
    assert m.verify(tmp_path) == []


def test_verify_catches_modified_and_missing_graphs(tmp_path):
    m = _manifest(tmp_path)
    graph = tmp_path / "atd.onnx"
    model = onnx.load(str(graph))
    model.graph.node[1].op_type = "Tanh"              # same signature, different model
    onnx.save(model, str(graph))
    problems = m.verify(tmp_path)
    assert len(problems) == 1 and "atd.onnx" in problems[0] and "sha256" in problems[0]
    graph.unlink()
    assert "missing" in m.verify(tmp_path)[0]


@pytest.mark.parametrize("content, problem", [
    (None, "not found"),
    ("{broken", "cannot read"),
    ("[1, 2]", "not a JSON object"),
    ('{"format_version": 99}', "format 99"),
])
def test_load_rejects_bad_files(tmp_path, content, problem):
    path = tmp_path / "manifest.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=problem) as e:
        Manifest.load(path)
    assert str(e.value).startswith(str(path))


def test_load_rejects_unknown_and_missing_keys(tmp_path):
    m = _manifest(tmp_path)
    m.save(tmp_path / "manifest.json")
    d = json.loads((tmp_path / "manifest.json").read_text())
    del d["lam"]
    d["lambda"] = 0.1
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match=r"unknown \['lambda'\], missing \['lam'\]"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("key, default, bad, problem", [
    ("detector", "atd", "oracle", r"'detector' must be one of atd, intensity, got \"oracle\""),
    ("contralateral", 0.0, 1.5, r"contralateral"),
])
def test_an_export_from_before_a_later_key_reads_as_its_default_and_a_bad_value_is_refused(tmp_path, key, default,
                                                                                           bad, problem):
    m = _manifest(tmp_path)
    m.save(tmp_path / "manifest.json")
    d = json.loads((tmp_path / "manifest.json").read_text())
    del d[key]                                                     # written before the key existed
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    assert getattr(Manifest.load(tmp_path), key) == default
    d[key] = bad
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match=problem):
        Manifest.load(tmp_path)


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "f.bin"
    with atomic_write(p) as tmp:
        tmp.write_bytes(b"first")
    with atomic_write(p) as tmp:
        tmp.write_bytes(np.arange(3, dtype=np.int32).tobytes())
    assert np.frombuffer(p.read_bytes(), np.int32).tolist() == [0, 1, 2]
    assert [q.name for q in tmp_path.iterdir()] == ["f.bin"]   # no temporary left behind


def test_atomic_write_temporaries_are_unique_per_call(tmp_path):
    """Two writers of one file at once (threads of one process) never share a temporary; the last rename wins."""
    p = tmp_path / "map.nii.gz"
    with atomic_write(p) as a, atomic_write(p) as b:
        assert a != b and a.name.endswith(".nii.gz") and b.name.endswith(".nii.gz")
        a.write_text("a")
        b.write_text("b")
    assert p.read_text() == "a" and [q.name for q in tmp_path.iterdir()] == ["map.nii.gz"]


def test_extra_is_typed_and_load_rejects_unknown_records(tmp_path):
    m = _manifest(tmp_path)
    m.save(tmp_path / "manifest.json")
    back = Manifest.load(tmp_path)
    assert back.extra.weights["atd"] == FileRecord("weights/atd.safetensors", "0" * 64)
    assert (back.extra.opset, back.extra.ood, back.extra.ort_graphs) == (20, None, {})
    d = json.loads((tmp_path / "manifest.json").read_text())
    for edit, message in ((lambda e: e["weights"]["atd"].update(size=1),
                           r"extra.weights.atd keys do not match: unknown \['size'\]"),
                          (lambda e: e.update(note="test"), r"extra keys do not match: unknown \['note'\]")):
        bad = json.loads(json.dumps(d))
        edit(bad["extra"])
        (tmp_path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(InputError, match=message):
            Manifest.load(tmp_path)

