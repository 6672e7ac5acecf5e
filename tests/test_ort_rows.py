"""Rows that need no work and the int8 graphs of the onnxruntime engine: the row-wise transformer copies run
only the rows that can change (not padding, not settled, each distinct row once), cut across worker sessions,
and give the full computation's tokens and maps; a slice's map does not depend on what it is packed with
(fp32 and int8); `mimood-export --int8` records its int8 copies, their checks and the map check, and a copy that
fails is not used; exports made before the rows were symbolic still run.

The run is `make_random_run`'s (random tiny-preset models, real slices, a calibration) with the ATD and MVTM
parameters moved off their initial values, as in tests/test_export_ort.py.
"""
import json
import shutil

import numpy as np
import pytest

from mimood.config import preset
from mimood.contract import Manifest, file_sha256, graph_io
from mimood.errors import InputError
from mimood.export import export as ex
from mimood.export.graphs import ORT_GRAPHS, export_ort
from mimood.export.validate import map_agreement, seed_rule
from mimood.models.checkpoint import load_model
from mimood.restore import restore
from mimood.runtime.batching import Packer, infer_slices, run_batch
from mimood.runtime.bundle import Bundle
from mimood.runtime.infer import load_engine
from mimood.runtime.ort import OrtEngine
from mimood.runtime.torch_backend import TorchEngine
from test_export_graphs import THRESHOLD, make_perturbed_run

B = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = make_perturbed_run(tmp_path_factory.mktemp("rows") / "run")
    manifest = ex.export_run(run, batch=B, int8=True, progress=False)
    return run, run / "export", manifest


def _slices(run, idx):
    return np.load(run / "data" / "val_slices.npz")["images"][idx].astype(np.float32)     # [n, H, W]


class _Rows:
    """A worker session that records how many rows each call runs (the real session computes them)."""

    def __init__(self, session, calls):
        self.session, self.calls = session, calls

    def run(self, names, feeds):
        self.calls.append(len(next(iter(feeds.values()))))
        return self.session.run(names, feeds)


def test_skipped_rows_give_the_full_computation(exported):
    run, out, m = exported
    cfg = preset("tiny").restore
    x = np.zeros((B, 1, 160, 160), np.float32)
    x[:3, 0] = _slices(run, [40, 80, 120])                                   # 3 slices + 1 padding slice
    models = [load_model(run / k / "best.safetensors")[0] for k in ("vqvae", "atd", "mvtm")]
    want = restore(TorchEngine(*models, cfg), x, cfg, np.random.default_rng(5), lam=m.lam, keep_tokens=True,
                   filled=3)
    engine = OrtEngine(Bundle.open(out), threads=1)
    assert engine.skips_rows and "rows: 1 x 1 thread" in engine.detail
    calls = {step: [] for step in ORT_GRAPHS}
    engine.workers = {k: [_Rows(s, calls[k]) for s in v] for k, v in engine.workers.items()}
    got = restore(engine, x, cfg, np.random.default_rng(5), lam=m.lam, keep_tokens=True, filled=3)
    rows = 3 * m.R
    np.testing.assert_array_equal(got.tokens[:rows], want.tokens[:rows])
    np.testing.assert_allclose(got.maps[:3], want.maps[:3], atol=1e-5)
    assert got.masked == want.masked and 0 < want.masked[0] < rows * 400
    assert got.maps[:3].max() > 0.05
    distinct = len(np.unique(want.input_tokens[:3], axis=0))    # the R copies of a slice are one row; no padding
    assert calls["atd"][0] == distinct and distinct >= 2
    assert all(n <= rows for n in calls["atd"] + calls["mvtm_step"])
    assert len(calls["mvtm_step"]) == len(want.masked)           # one call per iteration, the rows with a mask

    both = OrtEngine(Bundle.open(out), threads=2)                # rows cut across two worker sessions
    again = restore(both, x, cfg, np.random.default_rng(5), lam=m.lam, keep_tokens=True, filled=3)
    np.testing.assert_array_equal(again.tokens, got.tokens)
    np.testing.assert_array_equal(again.maps, got.maps)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_slice_map_does_not_depend_on_what_it_is_packed_with(exported, precision):
    run, out, m = exported
    engine = load_engine(out, "ort", precision, "cpu")
    cfg = engine.bundle.restore_config()
    a, other = _slices(run, [30, 60, 90]), _slices(run, [45, 75, 105, 135, 145])
    alone = infer_slices(engine, a, cfg, seed=3)                 # one batch: 3 slices + padding
    for before in (other[:1], other):                            # a split over two batches / after a full one
        packer = Packer(B)
        packer.add("other", before)
        packer.add("a", a)
        packed = np.zeros_like(a)
        for batch in packer.flush():
            maps = run_batch(engine, batch, cfg, seed=3)
            for (key, i), mi in zip(batch.rows, maps):
                if key == "a":
                    packed[i] = mi
        np.testing.assert_allclose(packed, alone, atol=1e-6)
    assert alone.max() > 0.05


def test_int8_copies_checks_and_map_check_in_the_manifest(exported):
    _, out, m = exported
    assert m == Manifest.load(out)
    assert sorted(m.extra.int8) == sorted(ORT_GRAPHS)
    for name, g in m.extra.int8.items():
        assert (g.file, g.source, g.precision) == (f"{name}.int8.onnx", f"{name}.ort.onnx", "int8")
        assert g.sha256 == file_sha256(out / g.file)
        assert (g.inputs, g.outputs) == (m.extra.ort_graphs[name].inputs, m.extra.ort_graphs[name].outputs)
        depth = preset("tiny").transformer.depth
        assert g.quantized == {"MatMul": 6 * depth + 1}          # q, k, v, out, 2 MLP per layer + the head
        assert "validation slices" in g.calibration and "onnxruntime.quantization" in g.method
        checks = m.validation[f"{name}.int8"]
        assert checks and any("rows" in c["name"] for c in checks)
        assert g.accepted is (name in m.extra.int8_maps.accepted) and g.accepted is not None
        assert g.accepted or g.reason
    check = m.extra.int8_maps
    assert (check.slices, check.seeds, check.threshold) == (B, [0, 1], THRESHOLD)
    assert set(check.yardstick) == {"mean_abs_err", "mask_disagreement"} and check.yardstick["mean_abs_err"] > 0
    key = "+".join(ORT_GRAPHS)
    assert key in check.candidates
    assert check.candidates[key]["passed"] == all(seed_rule(check.candidates[key], check.yardstick).values())
    bundle = Bundle.open(out)
    assert bundle.int8_steps() == check.accepted
    engine = OrtEngine(bundle, "int8", "cpu")
    assert all(s in engine.detail for s in check.accepted)


def test_precision_int8_is_onnxruntime_only_and_needs_int8_graphs(exported, tmp_path):
    _, out, m = exported
    assert load_engine(out, "auto", "int8", "cpu").name == "ort"
    with pytest.raises(ValueError, match="onnxruntime"):
        load_engine(out, "torch", "int8", "cpu")
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    d = json.loads((plain / "manifest.json").read_text())
    d["extra"]["int8"], d["extra"]["int8_maps"] = {}, None
    (plain / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="no int8 graphs in this export"):
        load_engine(plain, "ort", "int8", "cpu")
    turned_down = tmp_path / "down"
    shutil.copytree(out, turned_down)
    d = json.loads((turned_down / "manifest.json").read_text())
    d["extra"]["int8"]["atd"].update(accepted=False, reason="map check: failed")
    (turned_down / "manifest.json").write_text(json.dumps(d))
    engine = load_engine(turned_down, "ort", "int8", "cpu")
    assert Bundle.open(turned_down).int8_graph("atd") is None
    assert "int8: atd" not in engine.detail and ("int8: mvtm_step" in engine.detail) == \
        m.extra.int8["mvtm_step"].accepted


def test_an_int8_graph_that_fails_its_check_is_recorded_and_not_used(tmp_path, monkeypatch):
    run = make_perturbed_run(tmp_path / "run")
    strict = ex.Tolerances(token_mismatch=0, probs_atol=0, mask_mismatch=0, sample_mismatch=1.0, map_atol=0,
                           map_mean=0)
    monkeypatch.setitem(ex.TOLERANCES, "int8", strict)            # no int8 ATD is exact: it must fail
    m = ex.export_run(run, batch=B, int8=True, progress=False)     # the export itself goes on
    atd = m.extra.int8["atd"]
    assert atd.accepted is False and atd.reason.startswith("graph check: FAIL probs")
    assert "atd" not in m.extra.int8_maps.accepted
    assert not any("atd" in k.split("+") for k in m.extra.int8_maps.candidates)   # never tried in the loop
    engine = load_engine(run / "export", "ort", "int8", "cpu")
    assert "int8: atd" not in engine.detail


def test_exports_with_fixed_rows_still_run(exported, tmp_path):
    """An export from before the rows were symbolic (atd.ort.onnx made from atd.onnx, B*R rows) loads, runs
    every row, and gives the same maps."""
    run, out, m = exported
    old = tmp_path / "old"
    shutil.copytree(out, old)
    manifest = Manifest.load(old)
    for name in ORT_GRAPHS:
        export_ort(old / f"{name}.onnx", old / f"{name}.ort.onnx")
        r = manifest.extra.ort_graphs[name]
        r.sha256 = file_sha256(old / r.file)
        r.inputs, r.outputs = graph_io(old / r.file)["inputs"], graph_io(old / r.file)["outputs"]
        assert r.inputs == m.graphs[name]["inputs"]                 # B*R rows
    manifest.extra.int8, manifest.extra.int8_maps = {}, None
    manifest.save(old / "manifest.json")
    fixed = OrtEngine(Bundle.open(old), "fp32", "cpu")
    assert not fixed.skips_rows and "rows:" not in fixed.detail and "fused attention" in fixed.detail
    x = _slices(run, [50, 100, 110])
    cfg = Bundle.open(old).restore_config()
    np.testing.assert_allclose(infer_slices(fixed, x, cfg, seed=2),
                               infer_slices(OrtEngine(Bundle.open(out), "fp32", "cpu"), x, cfg, seed=2), atol=1e-6)


def test_seed_rule():
    ref = np.zeros((2, 4, 4), np.float32)
    brain = np.ones_like(ref, bool)
    near, far = ref + 0.01, ref + 0.3
    y = map_agreement(ref, far, brain, threshold=0.2)
    assert y == {"mean_abs_err": pytest.approx(0.3), "mask_disagreement": 1.0}
    assert seed_rule(map_agreement(ref, near, brain, 0.2), y) == {"mean_abs_err": True, "mask_disagreement": True}
    assert seed_rule(y, map_agreement(ref, near, brain, 0.2)) == {"mean_abs_err": False, "mask_disagreement": False}
    assert seed_rule(map_agreement(ref, near, brain, None), y) == {"mean_abs_err": True}   # no threshold: mean only
