"""The lean runtime: export-folder checks, fixed-shape batching, the onnxruntime engine against the PyTorch
reference, and the TensorRT engine up to the graphs it binds.

One tiny export (random-initialised tiny-preset models, no training, B = 4 slices, R = 2) is made once and
shared by this file and tests/test_infer.py (`tiny_export_folder`): random weights make varied tokens and an ATD that
masks most of them, so every step of the loop is exercised.
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from mimood.config import IMAGE_SIZE, preset
from mimood.contract import GRAPHS, Manifest, expected_io
from mimood.errors import InputError
from mimood.models.checkpoint import build_model, save_model
from mimood.runtime import infer_slices, load_engine
from mimood.runtime.batching import Packer, SliceNoise, run_batch
from mimood.runtime.bundle import Bundle

B, R = 4, 2
THRESHOLD = 0.1            # random models: between the median and the 99th percentile of map values


_EXPORT: dict = {}


def tiny_export_folder(tmp_path_factory):
    """A run folder of random tiny models (with a calibration: lambda 0.3, a map threshold) exported to ONNX,
    made once per test session (tests/test_infer.py uses it too)."""
    from mimood.export.export import export_run

    if "folder" not in _EXPORT:
        root = tmp_path_factory.mktemp("tiny")
        cfg = preset("tiny")
        run = root / "run"
        run.mkdir()
        cfg.save(run / "config.json")
        torch.manual_seed(0)
        for kind, c in (("vqvae", cfg.vqvae), ("atd", cfg.transformer), ("mvtm", cfg.transformer)):
            save_model(build_model(kind, c), run / kind / "best.safetensors", kind)
        (run / "calibration.json").write_text(json.dumps({"lam": 0.3, "threshold": THRESHOLD}))
        export_run(run, out=root / "export", batch=B, R=R, validate=False, build_engines=False, progress=False)
        _EXPORT["folder"] = root / "export"
    return _EXPORT["folder"]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    return tiny_export_folder(tmp_path_factory)


def slices(n: int, seed: int = 0) -> np.ndarray:
    """n brain-like slices [n, 160, 160] in [0, 1]: a textured ellipse, background 0."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] - IMAGE_SIZE / 2
    out = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i in range(n):
        brain = (yy / (60 - 2 * i)) ** 2 + (xx / 50) ** 2 <= 1
        out[i][brain] = rng.uniform(0.2, 1.0, int(brain.sum()))
    return out


def test_runtime_does_not_import_training_code_or_tensorrt():
    code = ("import sys, mimood.runtime, mimood.runtime.ort, mimood.runtime.torch_backend, "
            "mimood.runtime.trt_backend, mimood.cli.infer; "
            "bad = [m for m in sys.modules if m == 'mimood.train' or m.startswith('mimood.train.') "
            "or m == 'tensorrt']; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loop_contract_names_match_the_exporter():
    from mimood.export.graphs import GRAPHS as EXPORTED, IO_NAMES

    assert GRAPHS == EXPORTED
    io = expected_io(B, R)
    assert {g: (list(io[g]["inputs"]), list(io[g]["outputs"])) for g in GRAPHS} == \
        {g: tuple(IO_NAMES[g]) for g in GRAPHS}
    assert io["mvtm_step"]["inputs"]["mask"] == ([B * R, 400], "bool")
    assert io["decode_score"]["outputs"]["maps"] == ([B, IMAGE_SIZE, IMAGE_SIZE], "float32")


def test_packer_fills_fixed_batches_in_order_and_pads_the_last():
    p = Packer(4)
    p.add("a", np.full((3, 2, 2), 1.0))
    assert list(p.full()) == []                          # 3 < 4: nothing to run yet
    p.add("b", np.full((6, 2, 2), 2.0))
    full = list(p.full())
    assert len(full) == 2 and [b.rows for b in full] == [[("a", 0), ("a", 1), ("a", 2), ("b", 0)],
                                                         [("b", 1), ("b", 2), ("b", 3), ("b", 4)]]
    last = list(p.flush())
    assert len(last) == 1 and last[0].rows == [("b", 5)]
    assert last[0].images.shape == (4, 2, 2) and (last[0].images[0] == 2).all() and (last[0].images[1:] == 0).all()


def test_slice_noise_rows_come_from_each_slice_alone():
    u = SliceNoise([7, 3, None], R=2, seed=5).random((6, 10))
    alone = SliceNoise([3], R=2, seed=5).random((2, 10))
    assert np.array_equal(u[2:4], alone)                 # slice 3's rows do not depend on its neighbours
    assert (u[4:] == 0).all() and not np.array_equal(u[0:2], u[2:4])


@pytest.mark.parametrize("fused", [True, False])
def test_ort_engine_matches_the_torch_reference(tiny_export, tmp_path, fused):
    """With the exporter's onnxruntime-only ATD/MVTM graphs (fused attention) and with the standard ones."""
    export = tiny_export
    if not fused:                                        # an export without the onnxruntime-only copies
        export = tmp_path / "export"
        shutil.copytree(tiny_export, export)
        m = Manifest.load(export)
        m.extra.ort_graphs = {}
        m.save(export / "manifest.json")
    ort, ref = load_engine(export, "ort"), load_engine(export, "torch")
    assert (ort.name, ref.name, ort.batch, ort.R) == ("ort", "torch", B, R)
    rows = f" (rows: {ort.threads} x 1 thread)"            # the fused copies take any number of rows
    assert ort.detail == "ort fp32 CPUExecutionProvider" + (" (fused attention: atd, mvtm_step)" + rows
                                                              if fused else "")
    cfg = ort.bundle.restore_config()
    x = slices(6)                                        # 6 slices: one full batch, one padded
    got, want = infer_slices(ort, x, cfg, seed=1), infer_slices(ref, x, cfg, seed=1)
    assert got.shape == x.shape and got.dtype == np.float32
    assert want.max() > 0.01                             # a real map, not all zeros
    assert (got[x == 0] == 0).all()                      # zero outside the brain
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert not np.allclose(infer_slices(ort, x, cfg, seed=2), got, atol=1e-3)   # the seed matters


def test_torch_bf16_autocast_runs_the_loop_and_has_no_graphs(tiny_export):
    bf16, ref = load_engine(tiny_export, "auto", "bf16"), load_engine(tiny_export, "torch")
    assert bf16.detail == "torch bf16 cpu eager" and bf16.reason == "bf16 is the torch backend's autocast"
    x = slices(4)
    tokens = bf16.get(bf16.encode(bf16.put(x[:, None])))
    assert (tokens == ref.get(ref.encode(ref.put(x[:, None])))).mean() > 0.9     # bf16 moves few tokens
    maps = infer_slices(bf16, x, bf16.bundle.restore_config(), seed=1)
    assert maps.shape == x.shape and np.isfinite(maps).all() and (maps[x == 0] == 0).all()
    with pytest.raises(ValueError, match="torch backend only"):
        load_engine(tiny_export, "ort", "bf16")


def test_maps_do_not_depend_on_what_a_scan_is_packed_with(tiny_export):
    engine = load_engine(tiny_export, "ort")
    cfg = engine.bundle.restore_config()
    scan, other = slices(5, seed=3), slices(3, seed=4)

    def run(order):
        p, out = Packer(engine.batch), {k: np.zeros_like(v) for k, v in order}
        for k, v in order:
            p.add(k, v)
        for batch in p.flush():
            for (k, i), m in zip(batch.rows, run_batch(engine, batch, cfg, seed=0)):
                out[k][i] = m
        return out["scan"]

    np.testing.assert_allclose(run([("scan", scan)]), run([("other", other), ("scan", scan)]), atol=1e-6)


def test_bundle_refuses_an_edited_graph_and_a_missing_export(tiny_export, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    with open(copy / "atd.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(InputError, match="sha256 mismatch"):
        Bundle.open(copy)
    shutil.copyfile(tiny_export / "atd.onnx", copy / "atd.onnx")
    Bundle.open(copy)                                    # restored
    with open(copy / "mvtm_step.ort.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(InputError, match="sha256 mismatch"):
        load_engine(copy, "ort")
    with pytest.raises(InputError, match="export folder not found"):
        load_engine(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown backend"):
        load_engine(tiny_export, "tensorflow")


def test_bundle_reads_the_manifest_parameters(tiny_export):
    b = Bundle.open(tiny_export)
    cfg = b.restore_config()
    assert (cfg.R, cfg.batch, cfg.lam, cfg.threshold, cfg.T) == (R, B, 0.3, THRESHOLD, preset("tiny").restore.T)
    assert b.data_config().modality == "t2"
    assert b.graph("atd", "fp32") == tiny_export / "atd.onnx"
    with pytest.raises(InputError, match="no fp16 graphs"):
        b.graph("atd", "fp16")


def test_fp16_picks_the_half_precision_graph_of_each_step_that_has_one(tiny_export, tmp_path):
    """An fp16 export may keep a step in fp32 only; that step then runs its fp32 graph."""
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    shutil.copyfile(copy / "atd.onnx", copy / "atd.fp16.onnx")          # stands in for a converted graph
    m = Manifest.load(copy)
    m.add_graph("atd.fp16", copy / "atd.fp16.onnx", "fp16")
    m.save(copy / "manifest.json")
    b = Bundle.open(copy)
    assert b.precisions() == ["fp16", "fp32"]
    assert b.graph("atd", "fp16") == copy / "atd.fp16.onnx" and b.graph("atd", "fp32") == copy / "atd.onnx"
    assert b.graph("encode", "fp16") == copy / "encode.onnx"
    assert load_engine(b, "ort", precision="fp16").detail == "ort fp16 CPUExecutionProvider"
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        load_engine(b, "torch", precision="fp16", device="cpu")


def test_trt_plan_binds_the_export_graphs(tiny_export):
    """Everything the TensorRT engine does before TensorRT itself: the ONNX file of each step and the
    tensors its session binds, as the manifest records the (hash-checked) graph file."""
    from mimood.runtime.trt_backend import trt_plan

    plan = trt_plan(Bundle.open(tiny_export), "fp32")
    assert list(plan) == list(GRAPHS)
    assert {s: p.onnx.name for s, p in plan.items()} == {s: f"{s}.onnx" for s in GRAPHS}
    assert plan["mvtm_step"].inputs == {"tokens": ([B * R, 400], "int32"), "mask": ([B * R, 400], "bool"),
                                        "noise": ([B * R, 400], "float32")}
    assert plan["mvtm_step"].outputs == {"tokens_out": ([B * R, 400], "int32")}
    assert plan["encode"].inputs == {"x": ([B, 1, IMAGE_SIZE, IMAGE_SIZE], "float32")}
    assert plan["decode_score"].outputs == {"maps": ([B, IMAGE_SIZE, IMAGE_SIZE], "float32")}
    assert {p.precision for p in plan.values()} == {"fp32"}


def test_trt_plan_rejects_a_graph_of_other_shapes(tiny_export, tmp_path):
    """A manifest that claims another batch than its graphs were exported for is caught before binding."""
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    m = Manifest.load(copy)
    m.batch = B + 1
    m.save(copy / "manifest.json")
    with pytest.raises(InputError, match="loop contract"):
        Bundle.open(copy)


def test_trt_backend_without_tensorrt_is_a_clear_error(tiny_export):
    from mimood.runtime.trt import trt_available

    if trt_available()[0]:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(ValueError, match="trt backend cannot run here"):
        load_engine(tiny_export, "trt")


@pytest.mark.trt
def test_trt_engine_matches_ort(tiny_export, tmp_path):
    from mimood.runtime.trt import trt_available

    ok, why = trt_available()
    if not ok:
        pytest.skip(why)
    copy = tmp_path / "export"                           # engines are cached beside the graphs
    shutil.copytree(tiny_export, copy)
    trt, ort = load_engine(copy, "trt"), load_engine(copy, "ort", device="cpu")
    cfg, x = ort.bundle.restore_config(), slices(6)
    np.testing.assert_allclose(infer_slices(trt, x, cfg, seed=1), infer_slices(ort, x, cfg, seed=1), atol=1e-3)


@pytest.mark.gpu
def test_cuda_graph_engine_matches_torch_eager(tiny_export):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from mimood.runtime.torch_backend import CudaGraphEngine, TorchEngine

    graphs = load_engine(tiny_export, "torch", device="cuda")
    eager = load_engine(tiny_export, "torch", device="cpu")
    assert isinstance(graphs, CudaGraphEngine) and type(eager) is TorchEngine
    cfg, x = graphs.bundle.restore_config(), slices(6)
    np.testing.assert_allclose(infer_slices(graphs, x, cfg, seed=1), infer_slices(eager, x, cfg, seed=1),
                               atol=1e-3)
    assert len(graphs.graphs) == 2                       # one capture per step and shape, reused
